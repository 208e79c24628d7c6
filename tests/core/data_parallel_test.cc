// Data-parallel training in the core (core/collective.h, Model's shard arguments): N replicas,
// one thread per rank over a ThreadCollective, each given its shard of every batch, against one
// model given the whole batch. The replicas must end bit-identical to each other and equal the
// single model up to the order of floating-point sums: SyncBatchNorm statistics and running
// statistics, the whole batch's loss and gradients with unequal and empty shards, Dropout
// masks, a global non-finite refusal.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "core/collective.h"
#include "core/model.h"
#include "core/rng.h"
#include "tests/core/thread_collective.h"

namespace normd {
namespace {

using ::normd::testing::ThreadCollective;

LayerConfig Layer(LayerKind kind) {
  LayerConfig l;
  l.kind = kind;
  return l;
}
LayerConfig LinearLayer(int64_t in, int64_t out) {
  LayerConfig l = Layer(LayerKind::kLinear);
  l.linear.in_features = in;
  l.linear.out_features = out;
  return l;
}
LayerConfig Bn(LayerKind kind, int64_t c) {
  LayerConfig l = Layer(kind);
  l.batch_norm.num_features = c;
  return l;
}
LayerConfig DropoutLayer(float p) {
  LayerConfig l = Layer(LayerKind::kDropout);
  l.dropout_p = p;
  return l;
}
LayerConfig Conv(int64_t in, int64_t out) {
  LayerConfig l = Layer(LayerKind::kConv2d);
  l.conv2d.in_channels = in;
  l.conv2d.out_channels = out;
  l.conv2d.kernel_size = 3;
  l.conv2d.padding = 1;
  return l;
}

// Linear-BatchNorm1d-ReLU-Dropout-Linear, SGD with momentum, cross-entropy.
ModelConfig Mlp() {
  ModelConfig c;
  c.input_shape = {6};
  c.layers = {LinearLayer(6, 16), Bn(LayerKind::kBatchNorm1d, 16), Layer(LayerKind::kReLU),
              DropoutLayer(0.3f), LinearLayer(16, 3)};
  c.optimizer.sgd.lr = 0.1f;
  c.optimizer.sgd.momentum = 0.9f;
  c.seed = 7;
  return c;
}

// Conv-BatchNorm2d(momentum=None)-ReLU-Flatten-Linear, Adam, cross-entropy. The convolution has
// no bias, as before a BatchNorm in ResNets: its gradient would be zero up to rounding, and Adam
// turns rounding noise into steps of the full learning rate, which no two summation orders share.
ModelConfig Cnn() {
  ModelConfig c;
  c.input_shape = {2, 5, 5};
  LayerConfig bn = Bn(LayerKind::kBatchNorm2d, 4);
  bn.batch_norm.cumulative_average = true;
  LayerConfig conv = Conv(2, 4);
  conv.conv2d.bias = false;
  c.layers = {conv, bn, Layer(LayerKind::kReLU), Layer(LayerKind::kFlatten),
              LinearLayer(4 * 5 * 5, 3)};
  c.optimizer.kind = OptimizerKind::kAdam;
  c.optimizer.adam.lr = 0.01f;
  c.seed = 11;
  return c;
}

// A BasicBlock (Conv-BN-ReLU-Conv-BN plus a Conv-BN projection) and global average pooling:
// BatchNorm layers inside residual branches synchronise too. SGD with Nesterov momentum.
ModelConfig ResidualCnn() {
  ModelConfig c;
  c.input_shape = {2, 4, 4};
  auto conv = [](int64_t in, int64_t out) {
    LayerConfig l = Conv(in, out);
    l.conv2d.bias = false;
    return l;
  };
  LayerConfig block = Layer(LayerKind::kResidual);
  block.residual.body = {conv(2, 4), Bn(LayerKind::kBatchNorm2d, 4), Layer(LayerKind::kReLU),
                         conv(4, 4), Bn(LayerKind::kBatchNorm2d, 4)};
  LayerConfig projection = conv(2, 4);
  projection.conv2d.kernel_size = 1;
  projection.conv2d.padding = 0;
  block.residual.shortcut = {projection, Bn(LayerKind::kBatchNorm2d, 4)};
  c.layers = {block, Layer(LayerKind::kReLU), Layer(LayerKind::kAdaptiveAvgPool2d),
              Layer(LayerKind::kFlatten), LinearLayer(4, 3)};
  c.optimizer.sgd.lr = 0.05f;
  c.optimizer.sgd.momentum = 0.9f;
  c.optimizer.sgd.nesterov = true;
  c.seed = 5;
  return c;
}

// BatchNorm1d without affine parameters and one without running statistics, MSE.
ModelConfig NoAffineNoTracking() {
  ModelConfig c;
  c.input_shape = {5};
  LayerConfig plain = Bn(LayerKind::kBatchNorm1d, 8);
  plain.batch_norm.affine = false;
  LayerConfig untracked = Bn(LayerKind::kBatchNorm1d, 8);
  untracked.batch_norm.track_running_stats = false;
  c.layers = {LinearLayer(5, 8), plain, Layer(LayerKind::kTanh), LinearLayer(8, 8), untracked,
              LinearLayer(8, 2)};
  c.loss = LossKind::kMse;
  c.optimizer.sgd.lr = 0.05f;
  c.seed = 3;
  return c;
}

std::unique_ptr<Model> Build(const ModelConfig& c) {
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

Batch MakeBatch(const ModelConfig& c, int64_t rows, uint64_t seed) {
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
ConstTensorView Rows(const Tensor& t, int64_t begin, int64_t n) {
  ConstTensorView v = t.view();
  const int64_t per_row = v.shape.DropFirst().NumElements();
  v.shape = v.shape.DropFirst().WithBatch(n);
  v.data = t.data() + begin * per_row;
  return v;
}

Targets TargetsOf(const Batch& b, int64_t begin, int64_t n) {
  Targets t;
  if (!b.labels.empty()) {
    t.labels = b.labels.data() + begin;
    t.num_labels = n;
  } else {
    t.target = Rows(b.target, begin, n);
  }
  return t;
}

// Runs body(rank) on one thread per rank and waits for all.
void OnEveryRank(int world, const std::function<void(int)>& body) {
  std::vector<std::thread> threads;
  for (int r = 0; r < world; ++r) threads.emplace_back(body, r);
  for (std::thread& t : threads) t.join();
}

void ExpectBitIdentical(const std::vector<NamedTensor>& a, const std::vector<NamedTensor>& b,
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
void ExpectClose(const std::vector<NamedTensor>& a, const std::vector<NamedTensor>& b,
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

// Trains `steps` TrainSteps on batches of `rows` rows: one model on the whole batch, and a job
// of `world` replicas on shards. Compares losses each step, then the replicas with each other
// (bits) and with the single model (tolerance).
void TrainStepsMatch(const ModelConfig& config, int world, int64_t rows, int steps, bool eval_too,
                     double atol = 2e-5, double rtol = 2e-4) {
  SCOPED_TRACE("world " + std::to_string(world) + ", rows " + std::to_string(rows));
  std::unique_ptr<Model> single = Build(config);
  std::vector<std::unique_ptr<Model>> replicas;
  for (int r = 0; r < world; ++r) replicas.push_back(Build(config));
  ThreadCollective group(world);
  for (int step = 0; step < steps; ++step) {
    const Batch batch = MakeBatch(config, rows, 100 + step);
    ForwardRecord rec;
    TrainResult expected;
    ASSERT_TRUE(single->TrainStep(batch.x.view(), TargetsOf(batch, 0, rows), &rec, &expected).ok());
    std::vector<TrainResult> got(world);
    std::vector<Status> status(world);
    OnEveryRank(world, [&](int r) {
      DataParallelShard shard{group.rank(r), rows, 0};
      const int64_t n = ShardRows(rows, world, r, &shard.row_offset);
      ForwardRecord scratch;
      status[r] = replicas[r]->TrainStep(Rows(batch.x, shard.row_offset, n),
                                         TargetsOf(batch, shard.row_offset, n), &scratch, &got[r],
                                         shard);
    });
    for (int r = 0; r < world; ++r) {
      ASSERT_TRUE(status[r].ok()) << "rank " << r << ": " << status[r].message();
      EXPECT_EQ(got[r].loss, got[0].loss) << "rank " << r;  // the same bits everywhere
      EXPECT_EQ(got[r].step, expected.step);
      EXPECT_EQ(got[r].samples, rows);
    }
    EXPECT_NEAR(got[0].loss, expected.loss, 1e-5 * (1.0 + std::abs(expected.loss)))
        << "step " << step;
  }
  for (int r = 1; r < world; ++r) {
    ExpectBitIdentical(replicas[r]->GetState(true), replicas[0]->GetState(true),
                       "rank " + std::to_string(r));
  }
  ExpectClose(replicas[0]->GetState(true), single->GetState(true), atol, rtol, "after training");
  if (eval_too) {
    const Batch batch = MakeBatch(config, rows, 999);
    ForwardRecord rec;
    EvalResult expected;
    ASSERT_TRUE(single->Evaluate(batch.x.view(), TargetsOf(batch, 0, rows), &rec, &expected).ok());
    std::vector<EvalResult> got(world);
    OnEveryRank(world, [&](int r) {
      DataParallelShard shard{group.rank(r), rows, 0};
      const int64_t n = ShardRows(rows, world, r, &shard.row_offset);
      ForwardRecord scratch;
      EXPECT_TRUE(replicas[r]
                      ->Evaluate(Rows(batch.x, shard.row_offset, n),
                                 TargetsOf(batch, shard.row_offset, n), &scratch, &got[r], shard)
                      .ok());
    });
    for (int r = 0; r < world; ++r) {
      EXPECT_NEAR(got[r].loss, expected.loss, 1e-5 * (1.0 + std::abs(expected.loss)));
      EXPECT_EQ(got[r].accuracy, expected.accuracy);
      EXPECT_EQ(got[r].samples, rows);
    }
  }
}

TEST(ShardRowsTest, ContiguousSizesWithinOneLargerFirst) {
  int64_t offset = -1;
  EXPECT_EQ(ShardRows(257, 3, 0, &offset), 86);
  EXPECT_EQ(offset, 0);
  EXPECT_EQ(ShardRows(257, 3, 1, &offset), 86);
  EXPECT_EQ(offset, 86);
  EXPECT_EQ(ShardRows(257, 3, 2, &offset), 85);
  EXPECT_EQ(offset, 172);
  EXPECT_EQ(ShardRows(2, 3, 1, &offset), 1);
  EXPECT_EQ(offset, 1);
  EXPECT_EQ(ShardRows(2, 3, 2, &offset), 0);
  EXPECT_EQ(offset, 2);
}

TEST(DataParallelTest, MlpWithDropoutMatchesOneProcessWithUnequalShards) {
  TrainStepsMatch(Mlp(), 3, 257, 20, /*eval_too=*/true);
  TrainStepsMatch(Mlp(), 2, 64, 20, /*eval_too=*/true);
}

TEST(DataParallelTest, EmptyShardsWhenRanksOutnumberRows) {
  TrainStepsMatch(Mlp(), 3, 2, 10, /*eval_too=*/true);
  TrainStepsMatch(Mlp(), 4, 3, 10, /*eval_too=*/false);
}

TEST(DataParallelTest, CnnWithCumulativeBatchNorm2dAndAdam) {
  TrainStepsMatch(Cnn(), 3, 37, 20, /*eval_too=*/true);
  TrainStepsMatch(Cnn(), 2, 2, 5, /*eval_too=*/false);
}

TEST(DataParallelTest, ResidualBlockWithBatchNormInBothBranches) {
  TrainStepsMatch(ResidualCnn(), 3, 29, 20, /*eval_too=*/true);
}

TEST(DataParallelTest, NoAffineAndNoRunningStatisticsWithMse) {
  TrainStepsMatch(NoAffineNoTracking(), 3, 50, 20, /*eval_too=*/true);
}

// The running statistics the replicas commit are the whole batch's (unbiased variance over the
// whole batch's count), after one step exactly as after twenty.
TEST(DataParallelTest, RunningStatisticsAreTheWholeBatchs) {
  const ModelConfig config = Mlp();
  std::unique_ptr<Model> single = Build(config);
  const int world = 3;
  std::vector<std::unique_ptr<Model>> replicas;
  for (int r = 0; r < world; ++r) replicas.push_back(Build(config));
  ThreadCollective group(world);
  const Batch batch = MakeBatch(config, 10, 5);
  ForwardRecord rec;
  ASSERT_TRUE(single->Forward(batch.x.view(), &rec).ok());
  OnEveryRank(world, [&](int r) {
    DataParallelShard shard{group.rank(r), 10, 0};
    const int64_t n = ShardRows(10, world, r, &shard.row_offset);
    ForwardRecord scratch;
    EXPECT_TRUE(replicas[r]->Forward(Rows(batch.x, shard.row_offset, n), &scratch, shard).ok());
  });
  const BatchNorm* expected = single->net().node(1).layer->AsBatchNorm();
  for (int r = 0; r < world; ++r) {
    const BatchNorm* got = replicas[r]->net().node(1).layer->AsBatchNorm();
    EXPECT_EQ(got->num_batches_tracked(), 1);
    for (int64_t c = 0; c < 16; ++c) {
      EXPECT_NEAR(got->running_mean().data()[c], expected->running_mean().data()[c], 1e-6);
      EXPECT_NEAR(got->running_var().data()[c], expected->running_var().data()[c], 1e-6);
    }
  }
}

// Forward + Backward + ApplyGradients with the output gradient split like the input: the
// shards' input gradients put together are the whole batch's, and the step is the same.
TEST(DataParallelTest, ForwardBackwardApplyGradientsMatchOneProcess) {
  const ModelConfig config = Cnn();
  const int world = 3;
  const int64_t rows = 17;
  std::unique_ptr<Model> single = Build(config);
  std::vector<std::unique_ptr<Model>> replicas;
  for (int r = 0; r < world; ++r) replicas.push_back(Build(config));
  ThreadCollective group(world);
  for (int step = 0; step < 5; ++step) {
    const Batch batch = MakeBatch(config, rows, 40 + step);
    ForwardRecord rec;
    ASSERT_TRUE(single->Forward(batch.x.view(), &rec).ok());
    Tensor grad_output, grad_input;
    ComputeLoss(config.loss, rec.output().view(), TargetsOf(batch, 0, rows), &grad_output);
    ASSERT_TRUE(single->Backward(&rec, grad_output.view(), &grad_input).ok());
    uint64_t expected_step = 0;
    ASSERT_TRUE(single->ApplyGradients(&expected_step).ok());

    std::vector<Tensor> shard_dx(world);
    std::vector<uint64_t> steps(world);
    OnEveryRank(world, [&](int r) {
      DataParallelShard shard{group.rank(r), rows, 0};
      const int64_t n = ShardRows(rows, world, r, &shard.row_offset);
      ForwardRecord scratch;
      ASSERT_TRUE(replicas[r]->Forward(Rows(batch.x, shard.row_offset, n), &scratch, shard).ok());
      ASSERT_TRUE(replicas[r]
                      ->Backward(&scratch, Rows(grad_output, shard.row_offset, n), &shard_dx[r])
                      .ok());
      ASSERT_TRUE(replicas[r]->ApplyGradients(&steps[r], group.rank(r)).ok());
    });
    const int64_t per_row = grad_input.view().shape.DropFirst().NumElements();
    int64_t row = 0;
    for (int r = 0; r < world; ++r) {
      EXPECT_EQ(steps[r], expected_step);
      for (int64_t i = 0; i < shard_dx[r].size(); ++i) {
        EXPECT_NEAR(shard_dx[r].data()[i], grad_input.data()[row * per_row + i], 1e-6)
            << "rank " << r << " element " << i;
      }
      row += shard_dx[r].size() / per_row;
    }
    EXPECT_EQ(row, rows);
  }
  for (int r = 1; r < world; ++r) {
    ExpectBitIdentical(replicas[r]->GetState(true), replicas[0]->GetState(true),
                       "rank " + std::to_string(r));
  }
  ExpectClose(replicas[0]->GetState(true), single->GetState(true), 2e-5, 2e-4, "after 5 steps");
}

// Gradients that overflow on one rank only (its rows of the output gradient are huge) make the
// whole batch's non-finite: every rank refuses the step, and no replica changes.
TEST(DataParallelTest, ANonFiniteShardStopsEveryRank) {
  const ModelConfig config = Mlp();
  const int world = 3;
  std::vector<std::unique_ptr<Model>> replicas;
  for (int r = 0; r < world; ++r) replicas.push_back(Build(config));
  ThreadCollective group(world);
  const Batch batch = MakeBatch(config, 12, 1);
  Tensor grad_output(Shape{12, 3}, 0.01f);
  // The last rank's rows: finite, but the weight gradient they make (3e38 times activations of
  // order 1) overflows.
  for (int64_t i = 8 * 3; i < 12 * 3; ++i) grad_output.data()[i] = 3e38f;
  std::vector<std::vector<NamedTensor>> before(world);
  std::vector<Status> status(world);
  OnEveryRank(world, [&](int r) {
    DataParallelShard shard{group.rank(r), 12, 0};
    const int64_t n = ShardRows(12, world, r, &shard.row_offset);
    ForwardRecord scratch;
    ASSERT_TRUE(replicas[r]->Forward(Rows(batch.x, shard.row_offset, n), &scratch, shard).ok());
    before[r] = replicas[r]->GetState(true);
    ASSERT_TRUE(
        replicas[r]->Backward(&scratch, Rows(grad_output, shard.row_offset, n), nullptr).ok());
    uint64_t step = 0;
    status[r] = replicas[r]->ApplyGradients(&step, group.rank(r));
  });
  for (int r = 0; r < world; ++r) {
    EXPECT_EQ(status[r].code(), StatusCode::kFailedPrecondition) << "rank " << r;
    EXPECT_NE(status[r].message().find("non-finite gradients"), std::string::npos);
    EXPECT_EQ(replicas[r]->step(), 0u);
    ExpectBitIdentical(replicas[r]->GetState(true), before[r], "rank " + std::to_string(r));
    ExpectBitIdentical(replicas[r]->GetState(true), replicas[0]->GetState(true),
                       "rank " + std::to_string(r) + " against rank 0");
  }
}

// BatchNorm's one-value-per-channel rule is about the whole batch: a shard of one row is fine
// when the batch has more, and a batch of one row is refused on every rank.
TEST(DataParallelTest, OneValuePerChannelRuleUsesTheWholeBatch) {
  std::unique_ptr<Model> m = Build(Mlp());
  ThreadCollective group(1);
  const Batch batch = MakeBatch(Mlp(), 1, 2);
  DataParallelShard whole_of_two{group.rank(0), 2, 0};
  EXPECT_TRUE(m->CheckInput(batch.x.view(), true, whole_of_two).ok());
  DataParallelShard whole_of_one{group.rank(0), 1, 0};
  const Status s = m->CheckInput(batch.x.view(), true, whole_of_one);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("Expected more than 1 value per channel"), std::string::npos);
}

}  // namespace
}  // namespace normd
