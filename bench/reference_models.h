// The models the benchmarks measure, in one place so the kernel benchmarks, the in-process
// trainer and the RPC tools (and compare_torch.py, which mirrors them in PyTorch) agree.
//
//  - The reference MLP of issue 7: 784-512-BatchNorm1d-ReLU-512-BatchNorm1d-ReLU-10,
//    cross-entropy, SGD(lr=0.01, momentum=0.9).
//  - The small serving model: 32-64-BatchNorm1d-ReLU-10, cross-entropy, SGD(lr=0.01).
#ifndef NORMD_BENCH_REFERENCE_MODELS_H_
#define NORMD_BENCH_REFERENCE_MODELS_H_

#include <cstdint>
#include <vector>

#include "core/config.h"

namespace normd {
namespace bench {

inline LayerConfig LinearLayer(int64_t in, int64_t out) {
  LayerConfig c;
  c.kind = LayerKind::kLinear;
  c.linear.in_features = in;
  c.linear.out_features = out;
  return c;
}

inline LayerConfig BatchNorm1dLayer(int64_t features) {
  LayerConfig c;
  c.kind = LayerKind::kBatchNorm1d;
  c.batch_norm.num_features = features;
  return c;
}

inline LayerConfig ReluLayer() {
  LayerConfig c;
  c.kind = LayerKind::kReLU;
  return c;
}

// Linear(in, hidden[0]) BatchNorm1d ReLU ... Linear(hidden.back(), classes).
inline ModelConfig MlpConfig(int64_t in, const std::vector<int64_t>& hidden, int64_t classes,
                             float momentum, uint64_t seed) {
  ModelConfig m;
  m.input_shape = {in};
  int64_t prev = in;
  for (int64_t h : hidden) {
    m.layers.push_back(LinearLayer(prev, h));
    m.layers.push_back(BatchNorm1dLayer(h));
    m.layers.push_back(ReluLayer());
    prev = h;
  }
  m.layers.push_back(LinearLayer(prev, classes));
  m.loss = LossKind::kCrossEntropy;
  m.optimizer.kind = OptimizerKind::kSgd;
  m.optimizer.sgd.lr = 0.01f;
  m.optimizer.sgd.momentum = momentum;
  m.seed = seed;
  return m;
}

constexpr int64_t kReferenceIn = 784;
constexpr int64_t kReferenceHidden = 512;
constexpr int64_t kReferenceClasses = 10;

inline ModelConfig ReferenceMlpConfig(uint64_t seed = 1) {
  return MlpConfig(kReferenceIn, {kReferenceHidden, kReferenceHidden}, kReferenceClasses, 0.9f,
                   seed);
}

constexpr int64_t kSmallIn = 32;
constexpr int64_t kSmallHidden = 64;
constexpr int64_t kSmallClasses = 10;

inline ModelConfig SmallModelConfig(uint64_t seed = 1) {
  return MlpConfig(kSmallIn, {kSmallHidden}, kSmallClasses, 0.0f, seed);
}

}  // namespace bench
}  // namespace normd

#endif  // NORMD_BENCH_REFERENCE_MODELS_H_
