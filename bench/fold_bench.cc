// normd_fold_bench: eval-mode forward of a model against its FoldBatchNorm copy, in-process.
//
// For the reference MLP (784-512-BN-ReLU-512-BN-ReLU-10) and a Conv-BN CNN
// (3x32x32: Conv(3,32,3,p1)-BN-ReLU-MaxPool2-Conv(32,64,3,p1)-BN-ReLU-MaxPool2-Flatten-Linear(10)),
// after a few training steps (so the running statistics are not the defaults), times
// Model::Predict of the unfolded model in eval mode and of the folded copy at several batch
// sizes: the median of --repeats timed runs of --iters forwards each, after a warm-up. Prints a
// table and one JSON line per measurement; checks the outputs agree to 1e-5.
//
// Usage: normd_fold_bench [--threads T] [--repeats R] [--quick]
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "bench/reference_models.h"
#include "core/fold.h"
#include "core/model.h"
#include "core/rng.h"
#include "core/threads.h"

namespace normd {
namespace {

LayerConfig Conv(int64_t in, int64_t out) {
  LayerConfig c;
  c.kind = LayerKind::kConv2d;
  c.conv2d.in_channels = in;
  c.conv2d.out_channels = out;
  c.conv2d.kernel_size = 3;
  c.conv2d.padding = 1;
  return c;
}

LayerConfig Simple(LayerKind kind) {
  LayerConfig c;
  c.kind = kind;
  if (kind == LayerKind::kMaxPool2d) c.pool.kernel_size = 2;
  return c;
}

ModelConfig CnnConfig() {
  ModelConfig m;
  m.input_shape = {3, 32, 32};
  LayerConfig bn1 = Simple(LayerKind::kBatchNorm2d);
  bn1.batch_norm.num_features = 32;
  LayerConfig bn2 = Simple(LayerKind::kBatchNorm2d);
  bn2.batch_norm.num_features = 64;
  m.layers = {Conv(3, 32), bn1, Simple(LayerKind::kReLU), Simple(LayerKind::kMaxPool2d),
              Conv(32, 64), bn2, Simple(LayerKind::kReLU), Simple(LayerKind::kMaxPool2d),
              Simple(LayerKind::kFlatten), bench::LinearLayer(64 * 8 * 8, 10)};
  m.loss = LossKind::kCrossEntropy;
  m.optimizer.sgd.lr = 0.01f;
  m.optimizer.sgd.momentum = 0.9f;
  m.seed = 1;
  return m;
}

Shape SampleShape(const ModelConfig& c) {
  Shape s;
  Shape::FromVector(c.input_shape, &s);
  return s;
}

std::vector<float> RandomInput(int64_t n, Rng& rng) {
  std::vector<float> v(static_cast<size_t>(n));
  for (float& x : v) x = rng.Uniform(-1.0f, 1.0f) * 1.5f + 0.2f;
  return v;
}

double MedianSeconds(const Model& m, const ConstTensorView& x, int iters, int repeats) {
  ForwardRecord rec;
  for (int i = 0; i < 2; ++i) (void)m.Predict(x, &rec);  // warm-up: buffers sized
  std::vector<double> t;
  for (int r = 0; r < repeats; ++r) {
    const auto start = std::chrono::steady_clock::now();
    for (int i = 0; i < iters; ++i) (void)m.Predict(x, &rec);
    t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() /
                iters);
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

int Run(const char* name, const ModelConfig& config, const std::vector<int64_t>& batches,
        int repeats, bool quick) {
  std::unique_ptr<Model> model;
  Status s = Model::Create(config, Sequential::Limits(), &model);
  if (!s.ok()) {
    std::fprintf(stderr, "%s: %s\n", name, s.message().c_str());
    return 1;
  }
  Rng rng(7);
  const int64_t sample = SampleShape(config).NumElements();
  ForwardRecord scratch;
  for (int step = 0; step < 5; ++step) {  // move the running statistics off their defaults
    const int64_t n = 32;
    std::vector<float> x = RandomInput(n * sample, rng);
    std::vector<int64_t> labels(n);
    for (int64_t i = 0; i < n; ++i) labels[i] = i % 10;
    Targets t;
    t.labels = labels.data();
    t.num_labels = n;
    TrainResult r;
    Shape shape = SampleShape(config).WithBatch(n);
    s = model->TrainStep(ConstTensorView{x.data(), shape}, t, &scratch, &r);
    if (!s.ok()) {
      std::fprintf(stderr, "%s: %s\n", name, s.message().c_str());
      return 1;
    }
  }
  model->SetMode(false, false);
  FoldedModel folded;
  FoldBatchNorm(*model, &folded);
  std::unique_ptr<Model> copy;
  s = Model::Create(folded.config, Sequential::Limits(), &copy);
  if (s.ok()) s = copy->SetState(folded.state, true);
  if (!s.ok()) {
    std::fprintf(stderr, "%s folded: %s\n", name, s.message().c_str());
    return 1;
  }
  copy->SetMode(false, false);
  for (int64_t n : batches) {
    std::vector<float> x = RandomInput(n * sample, rng);
    const ConstTensorView view{x.data(), SampleShape(config).WithBatch(n)};
    ForwardRecord a, b;
    (void)model->Predict(view, &a);
    (void)copy->Predict(view, &b);
    double max_diff = 0.0;
    for (int64_t i = 0; i < a.output().size(); ++i) {
      max_diff = std::max(max_diff, std::fabs(double{a.output().data()[i]} - b.output().data()[i]));
    }
    // About 0.1 s of work per repeat on this class of machine.
    const double probe = MedianSeconds(*model, view, 1, 3);
    const int iters = std::max(1, static_cast<int>((quick ? 0.03 : 0.1) / std::max(probe, 1e-7)));
    const double t_unfolded = MedianSeconds(*model, view, iters, repeats);
    const double t_folded = MedianSeconds(*copy, view, iters, repeats);
    std::printf("%-4s batch %5lld  unfolded %9.1f us  folded %9.1f us  speed-up %.2fx  "
                "max |diff| %.1e\n",
                name, static_cast<long long>(n), t_unfolded * 1e6, t_folded * 1e6,
                t_unfolded / t_folded, max_diff);
    std::printf("{\"model\": \"%s\", \"batch\": %lld, \"unfolded_us\": %.2f, \"folded_us\": %.2f, "
                "\"speedup\": %.3f, \"max_abs_diff\": %.3g, \"layers\": [%zu, %zu]}\n",
                name, static_cast<long long>(n), t_unfolded * 1e6, t_folded * 1e6,
                t_unfolded / t_folded, max_diff, config.layers.size(), folded.config.layers.size());
    if (!(max_diff <= 1e-5)) {
      std::fprintf(stderr, "%s: folded output differs by %g\n", name, max_diff);
      return 1;
    }
  }
  return 0;
}

}  // namespace
}  // namespace normd

int main(int argc, char** argv) {
  int threads = 1, repeats = 7;
  bool quick = false;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--threads") && i + 1 < argc) {
      threads = std::atoi(argv[++i]);
    } else if (!std::strcmp(argv[i], "--repeats") && i + 1 < argc) {
      repeats = std::max(1, std::atoi(argv[++i]));
    } else if (!std::strcmp(argv[i], "--quick")) {
      quick = true;
      repeats = 3;
    } else {
      std::fprintf(stderr, "usage: normd_fold_bench [--threads T] [--repeats R] [--quick]\n");
      return 2;
    }
  }
  normd::SetComputeThreads(threads);
  std::printf("eval forward, unfolded vs FoldBatchNorm copy, in-process, %d compute thread(s)\n",
              threads);
  int rc = normd::Run("mlp", normd::bench::ReferenceMlpConfig(), {1, 32, 256, 1024}, repeats,
                      quick);
  if (rc == 0) rc = normd::Run("cnn", normd::CnnConfig(), {1, 32, 128}, repeats, quick);
  return rc;
}
