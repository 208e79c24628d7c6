// CRC-32C (Castagnoli polynomial 0x1EDC6F41, reflected 0x82F63B78), the checksum of iSCSI
// (RFC 3720), ext4 and leveldb. Checkpoint files frame every section with it.
//
// Table-driven (slicing-by-8), portable, no CPU feature requirements. Thread-safe: the tables
// are compile-time constants.
#ifndef NORMD_SERVER_CRC32C_H_
#define NORMD_SERVER_CRC32C_H_

#include <cstddef>
#include <cstdint>

namespace normd::server {

// Returns the CRC-32C of the bytes that gave `crc` followed by data[0, n): the CRC of a
// concatenation can be computed piece by piece, starting from 0 (the CRC of no bytes).
uint32_t Crc32cExtend(uint32_t crc, const void* data, size_t n);

inline uint32_t Crc32c(const void* data, size_t n) { return Crc32cExtend(0, data, n); }

}  // namespace normd::server

#endif  // NORMD_SERVER_CRC32C_H_
