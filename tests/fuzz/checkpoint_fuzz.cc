// Fuzz target: the checkpoint loader (server/checkpoint.h DecodeCheckpoint) on arbitrary bytes.
// It must reject or accept without crashing, leaking or reading out of bounds, and whatever it
// accepts must be internally consistent.
//
// Fuzzing builds define FUZZING_BUILD_MODE_UNSAFE_FOR_PRODUCTION, which makes the decoder skip
// CRC mismatches so the fuzzer reaches the section parsers behind them.
#include <cassert>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string_view>

#include "server/checkpoint.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  normd::server::LoadedCheckpoint out;
  const normd::Status st = normd::server::DecodeCheckpoint(
      std::string_view(reinterpret_cast<const char*>(data), size), &out);
  if (st.ok()) {
    if (out.model_id.empty()) std::abort();
    for (const normd::NamedTensor& e : out.state) {
      if (static_cast<int64_t>(e.values.size()) != e.shape.NumElements()) std::abort();
    }
  } else if (st.message().empty()) {
    std::abort();  // every rejection says why
  }
  return 0;
}
