// Tests of server/crc32c.{h,cc} against the RFC 3720 (iSCSI) check values.
#include "server/crc32c.h"

#include <gtest/gtest.h>

#include <cstring>
#include <string>

namespace normd::server {
namespace {

TEST(Crc32cTest, MatchesRfc3720CheckValues) {
  unsigned char buf[32];
  std::memset(buf, 0, sizeof(buf));
  EXPECT_EQ(Crc32c(buf, sizeof(buf)), 0x8A9136AAu);
  std::memset(buf, 0xFF, sizeof(buf));
  EXPECT_EQ(Crc32c(buf, sizeof(buf)), 0x62A8AB43u);
  for (int i = 0; i < 32; ++i) buf[i] = static_cast<unsigned char>(i);
  EXPECT_EQ(Crc32c(buf, sizeof(buf)), 0x46DD794Eu);
  for (int i = 0; i < 32; ++i) buf[i] = static_cast<unsigned char>(31 - i);
  EXPECT_EQ(Crc32c(buf, sizeof(buf)), 0x113FDB5Cu);
  EXPECT_EQ(Crc32c("123456789", 9), 0xE3069283u);
  EXPECT_EQ(Crc32c("", 0), 0u);
}

TEST(Crc32cTest, ExtendingPieceByPieceEqualsTheWhole) {
  std::string data;
  for (int i = 0; i < 1000; ++i) data.push_back(static_cast<char>(i * 131 + 7));
  const uint32_t whole = Crc32c(data.data(), data.size());
  for (size_t cut : {size_t{0}, size_t{1}, size_t{7}, size_t{8}, size_t{9}, size_t{500},
                     size_t{999}, size_t{1000}}) {
    const uint32_t first = Crc32c(data.data(), cut);
    EXPECT_EQ(Crc32cExtend(first, data.data() + cut, data.size() - cut), whole) << cut;
  }
  // Unaligned starts take the same path as aligned ones.
  EXPECT_EQ(Crc32c(data.data() + 3, 100), Crc32c(std::string(data, 3, 100).data(), 100));
}

}  // namespace
}  // namespace normd::server
