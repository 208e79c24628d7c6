// Small helpers shared by the fuzz targets and their seed generator: a reader that turns fuzzed
// bytes into decisions (running out of bytes reads zeros, so every input is a valid program),
// invariant checks that abort (a violated invariant must be a crash the fuzzer reports), and
// bitwise state comparison.
#ifndef NORMD_TESTS_FUZZ_FUZZ_UTIL_H_
#define NORMD_TESTS_FUZZ_FUZZ_UTIL_H_

#include <cstdarg>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "core/model.h"
#include "core/status.h"

namespace normd::fuzz {

// Reports a broken invariant and aborts, so libFuzzer (or the replay main) records a crash.
[[noreturn]] inline void Fail(const char* format, ...) {
  std::va_list args;
  va_start(args, format);
  std::fputs("fuzz invariant violated: ", stderr);
  std::vfprintf(stderr, format, args);
  std::fputc('\n', stderr);
  va_end(args);
  std::abort();
}

#define NORMD_FUZZ_CHECK(cond, ...)                \
  do {                                             \
    if (!(cond)) ::normd::fuzz::Fail(__VA_ARGS__); \
  } while (0)

inline const char* CodeName(StatusCode code) {
  switch (code) {
    case StatusCode::kOk:
      return "OK";
    case StatusCode::kInvalidArgument:
      return "INVALID_ARGUMENT";
    case StatusCode::kFailedPrecondition:
      return "FAILED_PRECONDITION";
    case StatusCode::kNotFound:
      return "NOT_FOUND";
    case StatusCode::kAlreadyExists:
      return "ALREADY_EXISTS";
    case StatusCode::kResourceExhausted:
      return "RESOURCE_EXHAUSTED";
    case StatusCode::kPermissionDenied:
      return "PERMISSION_DENIED";
    case StatusCode::kUnavailable:
      return "UNAVAILABLE";
    case StatusCode::kAborted:
      return "ABORTED";
    case StatusCode::kInternal:
      return "INTERNAL";
  }
  return "?";
}

// Consumes the input front to back; past the end every read yields zero.
class ByteReader {
 public:
  ByteReader(const uint8_t* data, size_t size) : data_(data), size_(size) {}

  bool empty() const { return pos_ >= size_; }
  uint8_t Byte() { return pos_ < size_ ? data_[pos_++] : 0; }
  bool Bool() { return (Byte() & 1) != 0; }
  uint32_t U32() {
    uint32_t v = 0;
    for (int i = 0; i < 4; ++i) v |= uint32_t{Byte()} << (8 * i);
    return v;
  }

 private:
  const uint8_t* data_;
  size_t size_;
  size_t pos_ = 0;
};

// Deterministic values in [-1, 1) for model inputs the fuzzer does not choose.
inline std::vector<float> PseudoRandom(size_t n, uint64_t seed) {
  std::vector<float> v(n);
  uint64_t s = seed * 0x9e3779b97f4a7c15ULL + 0x632be59bd9b4e019ULL;
  for (float& x : v) {
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    x = static_cast<float>(s >> 40) / static_cast<float>(1 << 23) - 1.0f;
  }
  return v;
}

// True when both states have the same entries, shapes and bit-identical values.
inline bool SameState(const std::vector<NamedTensor>& a, const std::vector<NamedTensor>& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    if (a[i].name != b[i].name || a[i].shape != b[i].shape ||
        a[i].values.size() != b[i].values.size()) {
      return false;
    }
    if (!a[i].values.empty() &&
        std::memcmp(a[i].values.data(), b[i].values.data(), a[i].values.size() * 4) != 0) {
      return false;
    }
  }
  return true;
}

// The first entry whose values differ (for messages), or "".
inline std::string FirstDifference(const std::vector<NamedTensor>& a,
                                   const std::vector<NamedTensor>& b) {
  if (a.size() != b.size()) return "entry count";
  for (size_t i = 0; i < a.size(); ++i) {
    if (!SameState({a[i]}, {b[i]})) return a[i].name;
  }
  return "";
}

}  // namespace normd::fuzz

#endif  // NORMD_TESTS_FUZZ_FUZZ_UTIL_H_
