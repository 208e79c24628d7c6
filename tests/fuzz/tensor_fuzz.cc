// Fuzz target: the server's tensor decoding (server/convert.h), checked against an independent
// statement of the wire rules.
//
// The first byte chooses the message, the rest is its binary encoding:
//   0  normd.v1.Tensor            DecodeTensor, as Forward's input and Backward's grad_output
//   1  normd.v1.TrainStepRequest  DecodeTensor(input) and DecodeTargets(labels, target)
//   2  normd.v1.ModelState        StateFromWire, as SetState
// Invariants (abort on violation): the decoder accepts exactly the tensors the rules allow (one
// encoding at most, raw a whole number of floats, rank <= kMaxRank, dimensions >= 0, an element
// count that fits in int64 (INVALID_ARGUMENT otherwise, whatever the limit), as many values as
// the shape's product, at most the element limit, which is RESOURCE_EXHAUSTED); what it
// accepts has the wire's shape and bit-identical values, read in place unless raw bytes had to be
// copied; encoding a decoded tensor and decoding it again gives the same tensor.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "core/tensor.h"
#include "normd/v1/normd.pb.h"
#include "server/convert.h"
#include "tests/fuzz/fuzz_util.h"

namespace normd::fuzz {
namespace {

constexpr int64_t kMaxElements = int64_t{1} << 16;

// What the rules say about a wire tensor, computed without the decoder.
struct Verdict {
  bool encoding_ok = true;  // one encoding, raw a multiple of 4, shape well formed
  bool too_large = false;   // the shape's product exceeds the limit
  bool ok = true;
  int64_t count = 0;  // supplied values
};

Verdict Judge(const v1::Tensor& w, int64_t max_elements) {
  Verdict v;
  const bool raw = !w.raw().empty();
  v.count = raw ? static_cast<int64_t>(w.raw().size() / 4) : w.values_size();
  if ((raw && w.values_size() > 0) || w.raw().size() % 4 != 0 || w.shape_size() > kMaxRank) {
    v.encoding_ok = false;
  }
  long double product = 1;  // exact enough to compare with a limit far below 2^63
  int64_t exact = 1;
  bool overflows = false, empty = false;
  for (int i = 0; i < w.shape_size(); ++i) {
    if (w.shape(i) < 0) v.encoding_ok = false;
    product *= static_cast<long double>(w.shape(i) < 0 ? 0 : w.shape(i));
    if (w.shape(i) <= 0) empty = true;
    if (w.shape(i) > 0) overflows = __builtin_mul_overflow(exact, w.shape(i), &exact) || overflows;
  }
  if (overflows && !empty) v.encoding_ok = false;  // malformed, not merely too large
  v.too_large = product > static_cast<long double>(max_elements);
  v.ok = v.encoding_ok && !v.too_large && static_cast<long double>(v.count) == product;
  return v;
}

void CheckSameTensor(const ConstTensorView& a, const ConstTensorView& b, const char* what) {
  NORMD_FUZZ_CHECK(a.shape == b.shape, "%s: shape %s vs %s", what, a.shape.ToString().c_str(),
                   b.shape.ToString().c_str());
  if (a.size() > 0) {
    NORMD_FUZZ_CHECK(std::memcmp(a.data, b.data, a.size() * sizeof(float)) == 0,
                     "%s: values differ", what);
  }
}

// Decodes `w` and checks the verdict and, when accepted, the decoded tensor.
bool CheckTensor(const v1::Tensor& w, const char* field, int64_t max_elements,
                 server::DecodedTensor* out) {
  const Verdict v = Judge(w, max_elements);
  const Status s = server::DecodeTensor(w, field, max_elements, out);
  NORMD_FUZZ_CHECK(s.ok() == v.ok, "%s: decoder says %s (%s), the rules say %s", field,
                   CodeName(s.code()), s.message().c_str(), v.ok ? "OK" : "invalid");
  if (!s.ok()) {
    NORMD_FUZZ_CHECK(!s.message().empty(), "%s: rejected without a message", field);
    if (s.code() == StatusCode::kResourceExhausted) {
      NORMD_FUZZ_CHECK(v.too_large, "%s: RESOURCE_EXHAUSTED for a tensor within the limit", field);
    } else {
      NORMD_FUZZ_CHECK(s.code() == StatusCode::kInvalidArgument, "%s: code %s", field,
                       CodeName(s.code()));
      NORMD_FUZZ_CHECK(!(v.encoding_ok && v.too_large),
                       "%s: an over-limit tensor is INVALID_ARGUMENT, not RESOURCE_EXHAUSTED",
                       field);
    }
    return false;
  }
  const ConstTensorView& t = out->view();
  NORMD_FUZZ_CHECK(t.shape.rank() == w.shape_size(), "%s: rank", field);
  for (int i = 0; i < w.shape_size(); ++i) {
    NORMD_FUZZ_CHECK(t.shape[i] == w.shape(i), "%s: dimension %d", field, i);
  }
  NORMD_FUZZ_CHECK(t.size() == v.count && t.size() <= max_elements, "%s: %lld elements for %lld",
                   field, static_cast<long long>(t.size()), static_cast<long long>(v.count));
  const bool raw = !w.raw().empty();
  NORMD_FUZZ_CHECK(out->raw() == raw, "%s: encoding reported wrongly", field);
  if (t.size() > 0) {
    const void* source = raw ? static_cast<const void*>(w.raw().data())
                             : static_cast<const void*>(w.values().data());
    NORMD_FUZZ_CHECK(std::memcmp(t.data, source, t.size() * sizeof(float)) == 0,
                     "%s: decoded values differ from the wire", field);
    // Zero copy: values always, raw whenever its bytes are float-aligned.
    const bool aligned = reinterpret_cast<uintptr_t>(source) % alignof(float) == 0;
    NORMD_FUZZ_CHECK(out->copied() == (raw && !aligned), "%s: copied=%d raw=%d aligned=%d", field,
                     out->copied(), raw, aligned);
    if (!out->copied()) NORMD_FUZZ_CHECK(t.data == source, "%s: not read in place", field);
  }
  // The response side: encode in the request's encoding and decode again.
  v1::Tensor again;
  server::EncodeTensor(t.data, t.shape, out->raw(), &again);
  server::DecodedTensor back;
  const Status s2 = server::DecodeTensor(again, field, max_elements, &back);
  NORMD_FUZZ_CHECK(s2.ok(), "%s: its own encoding does not decode: %s", field,
                   s2.message().c_str());
  CheckSameTensor(t, back.view(), "encode/decode round trip");
  return true;
}

void FuzzTrainStep(const v1::TrainStepRequest& req) {
  server::DecodedTensor input;
  if (req.has_input()) CheckTensor(req.input(), "input", kMaxElements, &input);

  server::DecodedTargets targets;
  const v1::Tensor* target = req.has_target() ? &req.target() : nullptr;
  const Status s = server::DecodeTargets(req.labels(), target, kMaxElements, &targets);
  bool expect_ok =
      !(req.labels_size() > 0 && target != nullptr) && req.labels_size() <= kMaxElements;
  if (expect_ok && target != nullptr) {
    server::DecodedTensor t;
    expect_ok = CheckTensor(*target, "target", kMaxElements, &t);
  }
  NORMD_FUZZ_CHECK(s.ok() == expect_ok, "DecodeTargets says %s (%s), expected %s",
                   CodeName(s.code()), s.message().c_str(), expect_ok ? "OK" : "an error");
  if (!s.ok()) {
    NORMD_FUZZ_CHECK(!s.message().empty(), "targets rejected without a message");
    return;
  }
  NORMD_FUZZ_CHECK(targets.targets.num_labels == req.labels_size() &&
                       (req.labels_size() == 0 || targets.targets.labels == req.labels().data()),
                   "labels not passed through in place");
  if (target != nullptr) {
    const Verdict v = Judge(*target, kMaxElements);
    NORMD_FUZZ_CHECK(targets.targets.target.size() == v.count, "target element count");
    CheckSameTensor(targets.targets.target, targets.target.view(), "target view");
  } else {
    NORMD_FUZZ_CHECK(targets.targets.target.data == nullptr, "a target without a target field");
  }
}

void FuzzState(const v1::ModelState& wire) {
  std::vector<NamedTensor> out;
  const Status s = server::StateFromWire(wire, kMaxElements, &out);
  bool expect_ok = true;
  for (const v1::NamedTensor& nt : wire.tensors()) {
    if (nt.name().empty()) {
      expect_ok = false;
      break;
    }
    server::DecodedTensor t;
    if (!CheckTensor(nt.tensor(), "state tensor", kMaxElements, &t)) {
      expect_ok = false;
      break;
    }
  }
  NORMD_FUZZ_CHECK(s.ok() == expect_ok, "StateFromWire says %s (%s), expected %s",
                   CodeName(s.code()), s.message().c_str(), expect_ok ? "OK" : "an error");
  if (!s.ok()) {
    NORMD_FUZZ_CHECK(!s.message().empty(), "state rejected without a message");
    return;
  }
  NORMD_FUZZ_CHECK(static_cast<int>(out.size()) == wire.tensors_size(), "state entry count");
  for (int i = 0; i < wire.tensors_size(); ++i) {
    server::DecodedTensor t;
    CheckTensor(wire.tensors(i).tensor(), "state tensor", kMaxElements, &t);
    NORMD_FUZZ_CHECK(out[i].name == wire.tensors(i).name(), "state entry %d name", i);
    CheckSameTensor(ConstTensorView{out[i].values.data(), out[i].shape}, t.view(), "state entry");
  }
  // GetState's side: the state written back decodes to the same entries.
  v1::ModelState again;
  server::StateToWire(out, &again);
  std::vector<NamedTensor> back;
  const Status s2 = server::StateFromWire(again, kMaxElements, &back);
  NORMD_FUZZ_CHECK(s2.ok() && SameState(out, back), "StateToWire/StateFromWire round trip: %s",
                   s2.message().c_str());
}

}  // namespace
}  // namespace normd::fuzz

extern "C" int LLVMFuzzerInitialize(int* /*argc*/, char*** /*argv*/) {
  google::protobuf::SetLogHandler(nullptr);  // parse failures are expected, not news
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const int which = data[0] % 3;
  const uint8_t* body = data + 1;
  const int n = static_cast<int>(size - 1);
  switch (which) {
    case 0: {
      normd::v1::Tensor t;
      if (!t.ParseFromArray(body, n)) return 0;
      normd::server::DecodedTensor out;
      normd::fuzz::CheckTensor(t, "tensor", normd::fuzz::kMaxElements, &out);
      break;
    }
    case 1: {
      normd::v1::TrainStepRequest req;
      if (req.ParseFromArray(body, n)) normd::fuzz::FuzzTrainStep(req);
      break;
    }
    case 2: {
      normd::v1::ModelState state;
      if (state.ParseFromArray(body, n)) normd::fuzz::FuzzState(state);
      break;
    }
  }
  return 0;
}
