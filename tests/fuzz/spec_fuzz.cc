// Fuzz target: model specs, from bytes to a trained step.
//
// The input is a normd.v1.ModelSpec, as the binary wire encoding (first byte < 0x20, as every
// protobuf tag of the message is) or as protobuf text format (readable seeds and hand-made edge
// cases, which mutate into deep specs far more often than binary bytes do). The spec goes
// through CreateModel's path: Registry::Create (id check, SpecToConfig, Model::Create under the
// registry's limits, the entry and its metrics), then, when the model is cheap enough to run,
// through a small training session: TrainStep, a retained Forward + Backward + ApplyGradients,
// eval-mode Forward and Evaluate, and a GetState/SetState round trip.
//
// Invariants (abort on violation): a rejection has a code the service documents and a message;
// a built model honours the limits and reports its spec back unchanged; every failed step leaves
// the state bit-identical; every successful step advances the step counter by one and reports a
// finite loss; eval-mode work changes nothing; SetState of GetState is the identity.
// Allocation is bounded by the limits below (libFuzzer's -malloc_limit_mb turns an oversized
// allocation into a crash) and time by skipping only models whose arithmetic is really large.
#include <google/protobuf/io/tokenizer.h>
#include <google/protobuf/text_format.h>
#include <google/protobuf/util/message_differencer.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "core/model.h"
#include "normd/v1/normd.pb.h"
#include "server/convert.h"
#include "server/metrics.h"
#include "server/registry.h"
#include "tests/fuzz/fuzz_util.h"

namespace normd::fuzz {
namespace {

constexpr int64_t kBatch = 2;  // the smallest batch BatchNorm trains on
// Multiply-adds (or window taps) per training pass above which a model is built but not run:
// a few milliseconds under ASan, so the fuzzer keeps its pace.
constexpr double kMaxWork = 4e6;

server::RegistryLimits Limits() {
  server::RegistryLimits l;
  l.max_models = 1;
  l.max_parameters = int64_t{1} << 16;
  l.max_batch_elements = int64_t{1} << 15;
  l.max_layers = 32;
  return l;
}

class SilentErrors : public google::protobuf::io::ErrorCollector {
 public:
  void AddError(int, google::protobuf::io::ColumnNumber, const std::string&) override {}
};

bool ParseSpec(const uint8_t* data, size_t size, v1::ModelSpec* spec) {
  if (size > 0 && data[0] >= 0x20) {
    google::protobuf::TextFormat::Parser parser;
    SilentErrors errors;
    parser.RecordErrorsTo(&errors);
    return parser.ParseFromString(std::string(reinterpret_cast<const char*>(data), size), spec);
  }
  return spec->ParseFromArray(data, static_cast<int>(size));
}

// The layer configs in node order (Sequential::nodes(): a residual block, then its body's
// layers, then its shortcut's).
void FlattenConfigs(const std::vector<LayerConfig>& layers, std::vector<const LayerConfig*>* out) {
  for (const LayerConfig& c : layers) {
    out->push_back(&c);
    if (c.kind == LayerKind::kResidual) {
      FlattenConfigs(c.residual.body, out);
      FlattenConfigs(c.residual.shortcut, out);
    }
  }
}

// The work of one forward pass of a batch, as a correct implementation does it: multiply-adds
// of linear and convolution layers, window taps that touch the input for pooling, a few passes
// over the activations for the rest; every layer of the tree, residual blocks' included.
double Work(const Model& model) {
  const Sequential& net = model.net();
  std::vector<const LayerConfig*> configs;
  FlattenConfigs(model.config().layers, &configs);
  double work = 0;
  for (int i = 0; i < net.num_nodes(); ++i) {
    const LayerConfig& c = *configs[i];
    const Shape& in = net.node(i).input_shape;
    const double out = static_cast<double>(net.node(i).output_shape.NumElements());
    switch (c.kind) {
      case LayerKind::kLinear:
        work += out * static_cast<double>(c.linear.in_features);
        break;
      case LayerKind::kConv2d:
        work += out * static_cast<double>(c.conv2d.in_channels / c.conv2d.groups) *
                static_cast<double>(c.conv2d.kernel_size * c.conv2d.kernel_size);
        break;
      case LayerKind::kMaxPool2d:
      case LayerKind::kAvgPool2d: {
        // (C, H, W) input: a window covers at most min(k, H) x min(k, W) real elements.
        const double k = static_cast<double>(c.pool.kernel_size);
        const double h = in.rank() == 3 ? static_cast<double>(in[1]) : k;
        const double w = in.rank() == 3 ? static_cast<double>(in[2]) : k;
        work += out * std::min(k, h) * std::min(k, w);
        break;
      }
      default:
        work += 4.0 * (static_cast<double>(in.NumElements()) + out);
    }
  }
  return work * kBatch;
}

// Targets the model's loss accepts for a batch of kBatch.
struct Batch {
  std::vector<float> x;
  Shape x_shape;
  std::vector<int64_t> labels;
  std::vector<float> target;
  Shape target_shape;
  Targets targets() const {
    Targets t;
    if (!labels.empty()) {
      t.labels = labels.data();
      t.num_labels = static_cast<int64_t>(labels.size());
    } else {
      t.target = ConstTensorView{target.data(), target_shape};
    }
    return t;
  }
};

Batch MakeBatch(const Model& model, uint64_t seed) {
  Batch b;
  const Sequential& net = model.net();
  b.x_shape = net.input_shape().WithBatch(kBatch);
  b.x = PseudoRandom(static_cast<size_t>(b.x_shape.NumElements()), seed);
  const Shape out = net.output_shape().WithBatch(kBatch);
  if (model.config().loss == LossKind::kCrossEntropy) {
    const int64_t classes = net.output_shape()[0];
    for (int64_t i = 0; i < kBatch; ++i) b.labels.push_back((i * 7 + 3) % classes);
  } else {
    b.target_shape = out;
    b.target = PseudoRandom(static_cast<size_t>(out.NumElements()), seed + 1);
    for (float& v : b.target) v = v < 0 ? 0.0f : 1.0f;  // BCE wants [0, 1]; MSE takes anything
  }
  return b;
}

// A step either succeeds (step + 1, finite loss) or is refused with the model unchanged.
void CheckStep(const Status& s, Model& model, const std::vector<NamedTensor>& before,
               uint64_t step_before, const char* what) {
  if (s.ok()) {
    NORMD_FUZZ_CHECK(model.step() == step_before + 1, "%s: step %llu after %llu", what,
                     static_cast<unsigned long long>(model.step()),
                     static_cast<unsigned long long>(step_before));
    return;
  }
  NORMD_FUZZ_CHECK(
      s.code() == StatusCode::kFailedPrecondition || s.code() == StatusCode::kInvalidArgument,
      "%s: unexpected %s: %s", what, CodeName(s.code()), s.message().c_str());
  NORMD_FUZZ_CHECK(model.step() == step_before, "%s failed but moved the step", what);
  NORMD_FUZZ_CHECK(SameState(before, model.GetState(true)), "%s failed (%s) but changed %s", what,
                   s.message().c_str(), FirstDifference(before, model.GetState(true)).c_str());
}

void Train(Model& model, uint64_t seed) {
  const Batch b = MakeBatch(model, seed);
  const ConstTensorView x{b.x.data(), b.x_shape};
  const Targets targets = b.targets();

  // 1. An atomic TrainStep.
  std::vector<NamedTensor> before = model.GetState(true);
  uint64_t step = model.step();
  ForwardRecord rec;
  TrainResult r;
  Status s = model.TrainStep(x, targets, &rec, &r);
  CheckStep(s, model, before, step, "TrainStep");
  if (s.ok()) {
    NORMD_FUZZ_CHECK(std::isfinite(r.loss), "TrainStep accepted a non-finite loss");
    NORMD_FUZZ_CHECK(r.step == model.step() && r.samples == kBatch, "TrainStep result");
  }

  // 2. The same by hand: a retained forward, Backward with dL/dy = 1/N, ApplyGradients.
  ForwardRecord fwd;
  s = model.Forward(x, &fwd);
  if (s.ok()) {
    fwd.RetainInput();
    const Tensor& y = fwd.output();
    NORMD_FUZZ_CHECK(y.shape() == model.net().output_shape().WithBatch(kBatch),
                     "Forward output shape %s", y.shape().ToString().c_str());
    const Tensor dy(y.shape(), 1.0f / kBatch);
    Tensor dx;
    s = model.Backward(&fwd, dy.view(), &dx);
    NORMD_FUZZ_CHECK(s.ok(), "Backward of a fresh forward: %s", s.message().c_str());
    NORMD_FUZZ_CHECK(dx.shape() == x.shape, "grad_input shape %s for input %s",
                     dx.shape().ToString().c_str(), x.shape.ToString().c_str());
    before = model.GetState(true);
    step = model.step();
    StepResult applied;
    s = model.ApplyGradients(&applied);
    CheckStep(s, model, before, step, "ApplyGradients");
    if (s.ok()) NORMD_FUZZ_CHECK(applied.step == model.step(), "ApplyGradients reported step");
    // The parameters moved (or the step was refused): the forward is stale either way when
    // they moved, and Backward says so instead of computing against the new parameters.
    if (s.ok()) {
      NORMD_FUZZ_CHECK(
          model.Backward(&fwd, dy.view(), nullptr).code() == StatusCode::kFailedPrecondition,
          "Backward of a forward older than a step was not refused as stale");
    }
  }

  // 3. Eval mode: forwards, Evaluate and Predict change nothing and agree bit for bit.
  model.SetMode(false, false);
  before = model.GetState(true);
  ForwardRecord e1, e2;
  const Status f1 = model.Forward(x, &e1);
  const Status f2 = model.Predict(x, &e2);
  NORMD_FUZZ_CHECK(f1.ok() == f2.ok(), "eval Forward and Predict disagree on the input");
  if (f1.ok()) {
    const Tensor& a = e1.output();
    const Tensor& b2 = e2.output();
    NORMD_FUZZ_CHECK(
        a.shape() == b2.shape() && std::memcmp(a.data(), b2.data(), a.size() * sizeof(float)) == 0,
        "eval-mode Forward and Predict differ");
  }
  EvalResult er;
  (void)model.Evaluate(x, targets, &e2, &er);
  NORMD_FUZZ_CHECK(SameState(before, model.GetState(true)), "eval-mode work changed %s",
                   FirstDifference(before, model.GetState(true)).c_str());

  // 4. SetState(GetState()) is the identity, strictly.
  s = model.SetState(before, /*strict=*/true);
  if (s.ok()) {
    NORMD_FUZZ_CHECK(SameState(before, model.GetState(true)), "SetState(GetState) changed %s",
                     FirstDifference(before, model.GetState(true)).c_str());
  } else {
    // Only a non-finite value (a parameter that overflowed during training) may be refused.
    bool finite = true;
    for (const NamedTensor& t : before) finite &= AllFinite(t.values.data(), t.values.size());
    NORMD_FUZZ_CHECK(!finite, "SetState refused the model's own state: %s", s.message().c_str());
  }
}

// Metrics are process-wide in the server too; one registry per input.
server::Metrics* ProcessMetrics() {
  static server::Metrics* metrics = new server::Metrics("fuzz");
  return metrics;
}

void Run(const v1::ModelSpec& spec) {
  server::Registry registry(Limits(), ProcessMetrics(), /*pool=*/nullptr);
  std::shared_ptr<server::ModelEntry> entry;
  const Status s = registry.Create(server::Principal(), "fuzz", spec, &entry);
  if (!s.ok()) {
    NORMD_FUZZ_CHECK(
        s.code() == StatusCode::kInvalidArgument || s.code() == StatusCode::kResourceExhausted,
        "CreateModel answered %s: %s", CodeName(s.code()), s.message().c_str());
    NORMD_FUZZ_CHECK(!s.message().empty(), "a rejected spec without a message");
    NORMD_FUZZ_CHECK(registry.size() == 0, "a rejected spec left a model behind");
    return;
  }
  std::unique_lock<std::shared_mutex> lock(entry->mu());
  Model& model = entry->model();
  const Sequential& net = model.net();
  const server::RegistryLimits limits = Limits();
  NORMD_FUZZ_CHECK(net.parameter_count() <= limits.max_parameters, "parameter limit");
  NORMD_FUZZ_CHECK(net.num_layers() == spec.layers_size() && net.num_nodes() <= limits.max_layers,
                   "layer count");
  for (const LayerNode& node : net.nodes()) {
    NORMD_FUZZ_CHECK(node.output_shape.NumElements() <= limits.max_batch_elements,
                     "layer %s produces %lld elements per sample", node.path.c_str(),
                     static_cast<long long>(node.output_shape.NumElements()));
  }
  v1::Model wire;
  entry->ToWire(&wire);
  NORMD_FUZZ_CHECK(google::protobuf::util::MessageDifferencer::Equals(wire.spec(), spec),
                   "the model reports a spec other than the one it was created from");
  NORMD_FUZZ_CHECK(wire.parameter_count() == net.parameter_count() &&
                       wire.mode() == v1::MODE_TRAIN && wire.step() == 0,
                   "a new model's summary");
  if (Work(model) <= kMaxWork) Train(model, spec.seed());
}

}  // namespace
}  // namespace normd::fuzz

extern "C" int LLVMFuzzerInitialize(int* /*argc*/, char*** /*argv*/) {
  google::protobuf::SetLogHandler(nullptr);  // parse failures are expected, not news
  normd::fuzz::ProcessMetrics();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  normd::v1::ModelSpec spec;
  if (normd::fuzz::ParseSpec(data, size, &spec)) normd::fuzz::Run(spec);
  return 0;
}
