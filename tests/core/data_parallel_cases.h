// Models, batches and comparisons shared by the data-parallel tests: tests/core's threads and
// tests/mpi's MPI ranks train the same cases and judge them the same way.
#ifndef NORMD_TESTS_CORE_DATA_PARALLEL_CASES_H_
#define NORMD_TESTS_CORE_DATA_PARALLEL_CASES_H_

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "core/model.h"
#include "core/rng.h"
#include "tests/core/layer_configs.h"

namespace normd::testing {

// BatchNorm1d with PyTorch's defaults.
inline LayerConfig Bn1d(int64_t c) {
  LayerConfig l = Simple(LayerKind::kBatchNorm1d);
  l.batch_norm.num_features = c;
  return l;
}

// Linear-BatchNorm1d-ReLU-Dropout-Linear, SGD with momentum, cross-entropy.
inline ModelConfig Mlp() {
  ModelConfig c;
  c.input_shape = {6};
  c.layers = {Linear(6, 16), Bn1d(16), Simple(LayerKind::kReLU), Dropout(0.3f), Linear(16, 3)};
  c.optimizer.sgd.lr = 0.1f;
  c.optimizer.sgd.momentum = 0.9f;
  c.seed = 7;
  return c;
}

// The MLP with the training recipe: warm-up then cosine schedule, gradient clipping that bites
// (max norm 0.05), label smoothing, AdamW without decay on BatchNorm and biases. The norm the
// clipping measures is the whole batch's gradient's. The first Linear has no bias: before a
// BatchNorm its gradient is zero up to rounding, which Adam would turn into full steps.
inline ModelConfig MlpWithRecipe() {
  ModelConfig c = Mlp();
  c.layers[0].linear.bias = false;
  c.optimizer.kind = OptimizerKind::kAdam;
  c.optimizer.adam.lr = 0.01f;
  c.optimizer.adam.weight_decay = 0.05f;
  c.optimizer.adam.decoupled_weight_decay = true;
  c.optimizer.no_weight_decay_on_norm_and_bias = true;
  c.optimizer.max_grad_norm = 0.05;
  c.optimizer.schedule.warmup_steps = 3;
  c.optimizer.schedule.decay = LrScheduleConfig::Decay::kCosine;
  c.optimizer.schedule.t_max = 15;
  c.label_smoothing = 0.1;
  return c;
}

// Conv-BatchNorm2d(momentum=None)-ReLU-Flatten-Linear, Adam, cross-entropy. The convolution has
// no bias, as before a BatchNorm in ResNets: its gradient would be zero up to rounding, and Adam
// turns rounding noise into steps of the full learning rate, which no two summation orders share.
inline ModelConfig Cnn() {
  ModelConfig c;
  c.input_shape = {2, 5, 5};
  LayerConfig bn = Bn2d(4);
  bn.batch_norm.cumulative_average = true;
  c.layers = {Conv(2, 4, 3, 1, 1), bn, Simple(LayerKind::kReLU), Simple(LayerKind::kFlatten),
              Linear(4 * 5 * 5, 3)};
  c.optimizer.kind = OptimizerKind::kAdam;
  c.optimizer.adam.lr = 0.01f;
  c.seed = 11;
  return c;
}

// A BasicBlock (Conv-BN-ReLU-Conv-BN plus a Conv-BN projection) and global average pooling:
// BatchNorm layers inside residual branches synchronise too. SGD with Nesterov momentum.
inline ModelConfig ResidualCnn() {
  ModelConfig c;
  c.input_shape = {2, 4, 4};
  c.layers = {Residual({Conv(2, 4, 3, 1, 1), Bn2d(4), Simple(LayerKind::kReLU),
                        Conv(4, 4, 3, 1, 1), Bn2d(4)},
                       {Conv(2, 4, 1), Bn2d(4)}),
              Simple(LayerKind::kReLU), Simple(LayerKind::kAdaptiveAvgPool2d),
              Simple(LayerKind::kFlatten), Linear(4, 3)};
  c.optimizer.sgd.lr = 0.05f;
  c.optimizer.sgd.momentum = 0.9f;
  c.optimizer.sgd.nesterov = true;
  c.seed = 5;
  return c;
}

// BatchNorm1d without affine parameters and one without running statistics, MSE.
inline ModelConfig NoAffineNoTracking() {
  ModelConfig c;
  c.input_shape = {5};
  LayerConfig plain = Bn1d(8);
  plain.batch_norm.affine = false;
  LayerConfig untracked = Bn1d(8);
  untracked.batch_norm.track_running_stats = false;
  c.layers = {Linear(5, 8), plain, Simple(LayerKind::kTanh), Linear(8, 8), untracked,
              Linear(8, 2)};
  c.loss = LossKind::kMse;
  c.optimizer.sgd.lr = 0.05f;
  c.seed = 3;
  return c;
}

inline std::unique_ptr<Model> Build(const ModelConfig& c) {
  std::unique_ptr<Model> m;
  Status s = Model::Create(c, Sequential::Limits(), &m);
  EXPECT_TRUE(s.ok()) << s.message();
  return m;
}

// One batch: inputs (rows x features) and either labels or a target.
struct Batch {
  Tensor x;
  std::vector<int64_t> labels;
  Tensor target;
};

inline Batch MakeBatch(const ModelConfig& c, int64_t rows, uint64_t seed) {
  Batch b;
  std::vector<int64_t> shape = {rows};
  shape.insert(shape.end(), c.input_shape.begin(), c.input_shape.end());
  Shape x_shape;
  EXPECT_TRUE(Shape::FromVector(shape, &x_shape));
  b.x = Tensor(x_shape);
  Rng rng(seed);
  for (int64_t i = 0; i < b.x.size(); ++i) b.x.data()[i] = rng.Uniform(-1.5f, 1.5f) + 0.3f;
  if (c.loss == LossKind::kCrossEntropy) {
    for (int64_t i = 0; i < rows; ++i) b.labels.push_back((i * 7 + seed) % 3);
  } else {
    b.target = Tensor(Shape{rows, 2});
    for (int64_t i = 0; i < b.target.size(); ++i) b.target.data()[i] = rng.Uniform(-1.0f, 1.0f);
  }
  return b;
}

// Rows [begin, begin + n) of a tensor whose first dimension is rows.
inline ConstTensorView Rows(const Tensor& t, int64_t begin, int64_t n) {
  ConstTensorView v = t.view();
  const int64_t per_row = v.shape.DropFirst().NumElements();
  v.shape = v.shape.DropFirst().WithBatch(n);
  v.data = t.data() + begin * per_row;
  return v;
}

inline Targets TargetsOf(const Batch& b, int64_t begin, int64_t n) {
  Targets t;
  if (!b.labels.empty()) {
    t.labels = b.labels.data() + begin;
    t.num_labels = n;
  } else {
    t.target = Rows(b.target, begin, n);
  }
  return t;
}

inline void ExpectBitIdentical(const std::vector<NamedTensor>& a, const std::vector<NamedTensor>& b,
                        const std::string& what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  for (size_t i = 0; i < a.size(); ++i) {
    ASSERT_EQ(a[i].values.size(), b[i].values.size()) << what << " " << a[i].name;
    EXPECT_EQ(0, std::memcmp(a[i].values.data(), b[i].values.data(),
                             a[i].values.size() * sizeof(float)))
        << what << ": " << a[i].name << " differs between replicas";
  }
}

// |a - b| <= atol + rtol * |b| element by element; counters (num_batches_tracked, steps) equal.
inline void ExpectClose(const std::vector<NamedTensor>& a, const std::vector<NamedTensor>& b,
                 double atol, double rtol, const std::string& what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  for (size_t i = 0; i < a.size(); ++i) {
    ASSERT_EQ(a[i].name, b[i].name) << what;
    ASSERT_EQ(a[i].values.size(), b[i].values.size()) << what << " " << a[i].name;
    double worst = 0.0;
    int64_t at = -1;
    for (size_t j = 0; j < a[i].values.size(); ++j) {
      const double d = std::abs(double{a[i].values[j]} - b[i].values[j]) -
                       rtol * std::abs(double{b[i].values[j]});
      if (d > worst) worst = d, at = static_cast<int64_t>(j);
    }
    EXPECT_LE(worst, atol) << what << ": " << a[i].name << "[" << at << "] "
                           << (at >= 0 ? a[i].values[at] : 0) << " vs "
                           << (at >= 0 ? b[i].values[at] : 0);
  }
}

}  // namespace normd::testing

#endif  // NORMD_TESTS_CORE_DATA_PARALLEL_CASES_H_
