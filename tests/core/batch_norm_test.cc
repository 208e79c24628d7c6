// Semantics of core/batch_norm: PyTorch's rules checked against values computed here by hand
// (the live comparison with PyTorch itself is tests/parity).
#include "core/batch_norm.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "core/activation.h"

namespace normd {
namespace {

std::unique_ptr<BatchNorm> MakeBn(const BatchNormConfig& c, const Shape& sample, bool two_d) {
  auto bn = std::make_unique<BatchNorm>(c, two_d);
  Shape out;
  Status s = bn->Build(sample, &out);
  EXPECT_TRUE(s.ok()) << s.message();
  Rng rng(1);
  bn->Allocate(rng);
  return bn;
}

Tensor Filled(const Shape& s, std::vector<float> v) {
  Tensor t(s);
  EXPECT_EQ(static_cast<int64_t>(v.size()), t.size());
  std::copy(v.begin(), v.end(), t.data());
  return t;
}

ForwardContext Train() {
  ForwardContext c;
  c.training = true;
  c.update_running_stats = true;
  return c;
}

TEST(BatchNormTest, TrainingNormalisesWithBiasedBatchVariance) {
  BatchNormConfig c;
  c.num_features = 2;
  auto bn = MakeBn(c, Shape{2}, false);
  // Channel 0: {1, 3} -> mean 2, biased var 1. Channel 1: {10, 10} -> var 0.
  Tensor x = Filled(Shape{2, 2}, {1, 10, 3, 10});
  Tensor y;
  LayerCache cache;
  bn->Forward(x.view(), &y, &cache, Train());
  const float inv = 1.0f / std::sqrt(1.0f + 1e-5f);
  EXPECT_NEAR(y.data()[0], -inv, 1e-6);
  EXPECT_NEAR(y.data()[2], inv, 1e-6);
  EXPECT_NEAR(y.data()[1], 0.0f, 1e-6);
}

TEST(BatchNormTest, RunningStatsUseMomentumAndUnbiasedVariance) {
  BatchNormConfig c;
  c.num_features = 1;
  c.momentum = 0.1f;
  auto bn = MakeBn(c, Shape{1}, false);
  Tensor x = Filled(Shape{4, 1}, {1, 2, 3, 6});  // mean 3, M2 = 4+1+0+9 = 14
  Tensor y;
  LayerCache cache;
  bn->Forward(x.view(), &y, &cache, Train());
  // Pending until committed.
  EXPECT_EQ(bn->running_mean().data()[0], 0.0f);
  EXPECT_EQ(bn->num_batches_tracked(), 0);
  BatchNormUpdate u = bn->Commit(&cache);
  EXPECT_NEAR(bn->running_mean().data()[0], 0.1 * 3.0, 1e-6);
  EXPECT_NEAR(bn->running_var().data()[0], 0.9 * 1.0 + 0.1 * (14.0 / 3.0), 1e-6);
  EXPECT_EQ(bn->num_batches_tracked(), 1);
  EXPECT_NEAR(u.running_mean_update_norm, 0.3, 1e-6);
  EXPECT_NEAR(u.running_var_update_norm, std::abs(0.1 * (14.0 / 3.0 - 1.0)), 1e-6);
  // A second commit of the same cache applies nothing.
  bn->Commit(&cache);
  EXPECT_EQ(bn->num_batches_tracked(), 1);
}

TEST(BatchNormTest, MomentumNoneIsCumulativeAverage) {
  BatchNormConfig c;
  c.num_features = 1;
  c.cumulative_average = true;
  auto bn = MakeBn(c, Shape{1}, false);
  const std::vector<std::vector<float>> batches = {{1, 3}, {5, 9}, {-2, 0}};
  double sum_mean = 0.0, sum_var = 0.0;
  for (const auto& b : batches) {
    Tensor x = Filled(Shape{2, 1}, b);
    Tensor y;
    LayerCache cache;
    bn->Forward(x.view(), &y, &cache, Train());
    bn->Commit(&cache);
    const double m = (b[0] + b[1]) / 2.0;
    sum_mean += m;
    sum_var += (b[0] - m) * (b[0] - m) + (b[1] - m) * (b[1] - m);  // unbiased, n - 1 = 1
  }
  // With m = 1/k the running value after k batches is the plain average of the batch values
  // (the initial 0 / 1 has weight 0 after the first batch).
  EXPECT_NEAR(bn->running_mean().data()[0], sum_mean / 3.0, 1e-5);
  EXPECT_NEAR(bn->running_var().data()[0], sum_var / 3.0, 1e-5);
  EXPECT_EQ(bn->num_batches_tracked(), 3);
}

TEST(BatchNormTest, EvalUsesRunningStatsAndChangesNothing) {
  BatchNormConfig c;
  c.num_features = 2;
  auto bn = MakeBn(c, Shape{2}, false);
  // Hand-set running stats.
  for (StateSlot& s : bn->state()) {
    if (s.name == "running_mean") { s.tensor->data()[0] = 1.0f; s.tensor->data()[1] = -1.0f; }
    if (s.name == "running_var") { s.tensor->data()[0] = 4.0f; s.tensor->data()[1] = 0.25f; }
  }
  Tensor x = Filled(Shape{1, 2}, {3.0f, 0.0f});  // batch of one is fine in eval
  Tensor y;
  LayerCache cache;
  ForwardContext eval;
  EXPECT_TRUE(bn->CheckBatch(Shape{1, 2}, eval).ok());
  bn->Forward(x.view(), &y, &cache, eval);
  EXPECT_NEAR(y.data()[0], (3.0 - 1.0) / std::sqrt(4.0 + 1e-5), 1e-6);
  EXPECT_NEAR(y.data()[1], (0.0 + 1.0) / std::sqrt(0.25 + 1e-5), 1e-5);
  EXPECT_FALSE(cache.has_pending_update);
  // Eval backward: dy * gamma / sqrt(rv + eps).
  Tensor dy = Filled(Shape{1, 2}, {1.0f, 2.0f});
  Tensor dx;
  bn->Backward(x.view(), y, dy.view(), cache, eval, &dx);
  EXPECT_NEAR(dx.data()[0], 1.0 / std::sqrt(4.0 + 1e-5), 1e-6);
  EXPECT_NEAR(dx.data()[1], 2.0 / std::sqrt(0.25 + 1e-5), 1e-5);
}

TEST(BatchNormTest, OneValuePerChannelInTrainingIsPyTorchsError) {
  BatchNormConfig c;
  c.num_features = 3;
  auto bn1 = MakeBn(c, Shape{3}, false);
  Status s = bn1->CheckBatch(Shape{1, 3}, Train());
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("Expected more than 1 value per channel when training"),
            std::string::npos);
  EXPECT_TRUE(bn1->CheckBatch(Shape{2, 3}, Train()).ok());
  // (1, C, L) with L == 1 is an error, L > 1 is fine.
  auto bn3 = MakeBn(c, Shape{3, 1}, false);
  EXPECT_FALSE(bn3->CheckBatch(Shape{1, 3, 1}, Train()).ok());
  auto bn3l = MakeBn(c, Shape{3, 5}, false);
  EXPECT_TRUE(bn3l->CheckBatch(Shape{1, 3, 5}, Train()).ok());
  // BatchNorm2d: (1, C, H, W) with H*W > 1 is allowed, (1, C, 1, 1) is not.
  auto bn2 = MakeBn(c, Shape{3, 2, 2}, true);
  EXPECT_TRUE(bn2->CheckBatch(Shape{1, 3, 2, 2}, Train()).ok());
  auto bn2one = MakeBn(c, Shape{3, 1, 1}, true);
  EXPECT_FALSE(bn2one->CheckBatch(Shape{1, 3, 1, 1}, Train()).ok());
  // Eval mode never objects.
  EXPECT_TRUE(bn2one->CheckBatch(Shape{1, 3, 1, 1}, ForwardContext()).ok());
}

TEST(BatchNormTest, WithoutTrackingThereAreNoBuffersAndEvalUsesBatchStats) {
  BatchNormConfig c;
  c.num_features = 1;
  c.track_running_stats = false;
  auto bn = MakeBn(c, Shape{1}, false);
  for (const StateSlot& s : bn->state()) {
    EXPECT_TRUE(s.name == "weight" || s.name == "bias") << s.name;
  }
  // Batch statistics in eval too, so PyTorch's one-value rule applies in eval as well.
  EXPECT_FALSE(bn->CheckBatch(Shape{1, 1}, ForwardContext()).ok());
  Tensor x = Filled(Shape{2, 1}, {0.0f, 4.0f});
  Tensor y;
  LayerCache cache;
  bn->Forward(x.view(), &y, &cache, ForwardContext());
  EXPECT_NEAR(y.data()[0], -2.0 / std::sqrt(4.0 + 1e-5), 1e-6);
  EXPECT_FALSE(BatchNorm::DriftOf(cache).valid);
}

TEST(BatchNormTest, AffineFalseHasNoParameters) {
  BatchNormConfig c;
  c.num_features = 4;
  c.affine = false;
  auto bn = MakeBn(c, Shape{4, 3, 3}, true);
  EXPECT_TRUE(bn->parameters().empty());
  EXPECT_EQ(bn->NumParameters(), 0);
  std::vector<std::string> names;
  for (const StateSlot& s : bn->state()) names.push_back(s.name);
  EXPECT_EQ(names, (std::vector<std::string>{"running_mean", "running_var",
                                             "num_batches_tracked"}));
}

TEST(BatchNormTest, BuildRejectsBadConfigurations) {
  Shape out;
  BatchNormConfig c;
  c.num_features = 64;
  Status s = BatchNorm(c, false).Build(Shape{50}, &out);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("num_features is 64 but the previous layer produces 50"),
            std::string::npos) << s.message();
  EXPECT_FALSE(BatchNorm(c, true).Build(Shape{64}, &out).ok());  // 2d needs (C, H, W)
  EXPECT_FALSE(BatchNorm(c, false).Build(Shape{64, 2, 2}, &out).ok());
  c.eps = 0.0f;
  EXPECT_FALSE(BatchNorm(c, false).Build(Shape{64}, &out).ok());
  c.eps = 1e-5f;
  c.momentum = 1.5f;
  EXPECT_FALSE(BatchNorm(c, false).Build(Shape{64}, &out).ok());
  c.momentum = 0.1f;
  c.num_features = 0;
  EXPECT_FALSE(BatchNorm(c, false).Build(Shape{64}, &out).ok());
}

TEST(BatchNormTest, DriftFiguresMatchTheirDefinition) {
  BatchNormConfig c;
  c.num_features = 2;
  auto bn = MakeBn(c, Shape{2}, false);  // running mean 0, var 1
  // Channel 0 values {2, 4}: mean 3, biased var 1. Channel 1 values {-1, -1}: mean -1, var 0.
  Tensor x = Filled(Shape{2, 2}, {2, -1, 4, -1});
  Tensor y;
  LayerCache cache;
  bn->Forward(x.view(), &y, &cache, ForwardContext());  // eval
  BatchNormDrift d = BatchNorm::DriftOf(cache);
  ASSERT_TRUE(d.valid);
  const double eps = 1e-5;
  const double shift = (3.0 / std::sqrt(1 + eps) + 1.0 / std::sqrt(1 + eps)) / 2.0;
  const double ratio = (std::abs(std::log((1 + eps) / (1 + eps))) +
                        std::abs(std::log((0 + eps) / (1 + eps)))) / 2.0;
  EXPECT_NEAR(d.mean_shift, shift, 1e-6);
  EXPECT_NEAR(d.var_log_ratio, ratio, 1e-4);
  // Training computes the same figures before its update.
  LayerCache train_cache;
  bn->Forward(x.view(), &y, &train_cache, Train());
  BatchNormDrift t = BatchNorm::DriftOf(train_cache);
  EXPECT_NEAR(t.mean_shift, shift, 1e-6);
  EXPECT_NEAR(t.var_log_ratio, ratio, 1e-4);
}

TEST(BatchNormTest, MomentsOfShardsCombineToTheWholeBatch) {
  Rng rng(7);
  const int64_t n = 10, ch = 3, s = 5;
  std::vector<float> x(n * ch * s);
  for (float& v : x) v = rng.Uniform(-3.0f, 5.0f);
  ChannelMoments whole, a, b;
  ComputeMoments(x.data(), n, ch, s, &whole);
  ComputeMoments(x.data(), 4, ch, s, &a);
  ComputeMoments(x.data() + 4 * ch * s, 6, ch, s, &b);
  CombineMoments(&a, b);
  ASSERT_EQ(a.count, whole.count);
  for (int64_t c = 0; c < ch; ++c) {
    EXPECT_NEAR(a.mean[c], whole.mean[c], 1e-12);
    EXPECT_NEAR(a.m2[c], whole.m2[c], 1e-9);
    // And the definition: biased variance from the raw values.
    double mean = 0.0, m2 = 0.0;
    for (int64_t i = 0; i < n; ++i)
      for (int64_t k = 0; k < s; ++k) mean += x[(i * ch + c) * s + k];
    mean /= n * s;
    for (int64_t i = 0; i < n; ++i)
      for (int64_t k = 0; k < s; ++k) {
        const double d = x[(i * ch + c) * s + k] - mean;
        m2 += d * d;
      }
    EXPECT_NEAR(whole.mean[c], mean, 1e-9);
    EXPECT_NEAR(whole.BiasedVar(c), m2 / (n * s), 1e-9);
  }
}

TEST(BatchNormTest, ResetRunningStatsRestoresInitialBuffers) {
  BatchNormConfig c;
  c.num_features = 2;
  auto bn = MakeBn(c, Shape{2}, false);
  Tensor x = Filled(Shape{2, 2}, {1, 2, 5, 9});
  Tensor y;
  LayerCache cache;
  bn->Forward(x.view(), &y, &cache, Train());
  bn->Commit(&cache);
  ASSERT_NE(bn->running_mean().data()[0], 0.0f);
  bn->ResetRunningStats();
  EXPECT_EQ(bn->running_mean().data()[0], 0.0f);
  EXPECT_EQ(bn->running_var().data()[1], 1.0f);
  EXPECT_EQ(bn->num_batches_tracked(), 0);
}


// ---- BatchNorm + ReLU, fused by ForwardLayers / BackwardLayers -------------------------------

bool SameBits(const float* a, const float* b, int64_t n) {
  return std::memcmp(a, b, sizeof(float) * n) == 0;
}

void FillRandom(Tensor* t, uint32_t seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(0.5f, 2.0f);
  for (int64_t i = 0; i < t->size(); ++i) t->data()[i] = dist(gen);
}

struct FusionCase {
  bool two_d;
  Shape sample;
  int64_t n;
  bool affine;
  bool track;
  bool training;
  bool frozen;
};

// The pair run fused (ForwardLayers, BackwardLayers) equals a BatchNorm and a ReLU layer run
// one after the other, bit for bit: the output, the input and parameter gradients, the running
// statistics after Commit, and the BatchNorm output RecomputeOutput gives back.
void ExpectFusedEqualsSeparate(const FusionCase& fc) {
  SCOPED_TRACE(testing::Message() << "sample " << fc.sample.ToString() << " n " << fc.n
                                  << " affine " << fc.affine << " track " << fc.track
                                  << " training " << fc.training << " frozen " << fc.frozen);
  BatchNormConfig c;
  c.num_features = fc.sample[0];
  c.affine = fc.affine;
  c.track_running_stats = fc.track;
  LayerList pair;
  pair.push_back(MakeBn(c, fc.sample, fc.two_d));
  pair.push_back(std::make_unique<Activation>(LayerKind::kReLU, 0.0f));
  BatchNorm* fused = pair[0]->AsBatchNorm();
  std::unique_ptr<BatchNorm> alone = MakeBn(c, fc.sample, fc.two_d);
  Activation relu(LayerKind::kReLU, 0.0f);

  Tensor x(fc.sample.WithBatch(fc.n)), dy(x.shape());
  FillRandom(&x, 1);
  FillRandom(&dy, 2);
  if (fc.affine) {
    // Channel 0 gets weight 0 and bias 0: its pre-ReLU values are exactly zero, where the
    // mask must say "not positive" in both directions.
    Tensor w(Shape{c.num_features}), b(Shape{c.num_features});
    FillRandom(&w, 3);
    FillRandom(&b, 4);
    w.data()[0] = b.data()[0] = 0.0f;
    for (BatchNorm* bn : {fused, alone.get()}) {
      std::vector<Parameter*> p = bn->parameters();
      p[0]->value = w;
      p[1]->value = b;
    }
  }
  if (fc.track) {
    // Non-trivial running statistics, the same in both.
    Tensor warm(x.shape());
    FillRandom(&warm, 5);
    for (BatchNorm* bn : {fused, alone.get()}) {
      Tensor y;
      LayerCache cache;
      bn->Forward(warm.view(), &y, &cache, Train());
      bn->Commit(&cache);
    }
  }
  fused->set_frozen(fc.frozen);
  alone->set_frozen(fc.frozen);
  ForwardContext ctx;
  ctx.training = fc.training;
  ctx.update_running_stats = fc.training;

  Tensor outs[2];
  LayerCache caches[2];
  ForwardLayers(pair, x.view(), ctx, outs, caches);
  Tensor bn_out, relu_out;
  LayerCache bn_cache, relu_cache;
  alone->Forward(x.view(), &bn_out, &bn_cache, ctx);
  relu.Forward(bn_out.view(), &relu_out, &relu_cache, ctx);

  EXPECT_TRUE(caches[0].relu_fused);
  EXPECT_EQ(outs[0].size(), 0);
  ASSERT_EQ(outs[1].shape(), relu_out.shape());
  EXPECT_TRUE(SameBits(outs[1].data(), relu_out.data(), relu_out.size()));
  Tensor recomputed;
  fused->RecomputeOutput(x.view(), caches[0], &recomputed);
  EXPECT_TRUE(SameBits(recomputed.data(), bn_out.data(), bn_out.size()));

  // Backward with an input gradient, and without one (the BatchNorm is then the stop).
  Tensor relu_dx, alone_dx;
  relu.Backward(bn_out.view(), relu_out, dy.view(), relu_cache, ctx, &relu_dx);
  alone->Backward(x.view(), bn_out, relu_dx.view(), bn_cache, ctx, &alone_dx);
  Tensor dx, buf_a, buf_b;
  BackwardLayers(pair, x.view(), outs, caches, dy.view(), ctx, &dx, &buf_a, &buf_b);
  ASSERT_EQ(dx.shape(), alone_dx.shape());
  EXPECT_TRUE(SameBits(dx.data(), alone_dx.data(), dx.size()));
  if (fc.affine) {
    const std::vector<Parameter*> f = fused->parameters(), a = alone->parameters();
    for (int i = 0; i < 2; ++i) {
      EXPECT_TRUE(SameBits(f[i]->grad.data(), a[i]->grad.data(), a[i]->grad.size()))
          << f[i]->name;
    }
    // Without an input gradient the pass stops at the BatchNorm and still accumulates its
    // parameter gradients: twice as much now.
    BackwardLayers(pair, x.view(), outs, caches, dy.view(), ctx, nullptr, &buf_a, &buf_b);
    for (int i = 0; i < 2; ++i) {
      for (int64_t k = 0; k < a[i]->grad.size(); ++k) {
        EXPECT_EQ(f[i]->grad.data()[k], 2.0f * a[i]->grad.data()[k]) << f[i]->name << " " << k;
      }
    }
  }
  if (fc.track) {
    fused->Commit(&caches[0]);
    alone->Commit(&bn_cache);
    EXPECT_TRUE(SameBits(fused->running_mean().data(), alone->running_mean().data(),
                         c.num_features));
    EXPECT_TRUE(SameBits(fused->running_var().data(), alone->running_var().data(),
                         c.num_features));
    EXPECT_EQ(fused->num_batches_tracked(), alone->num_batches_tracked());
  }
}

TEST(BatchNormReluFusionTest, FusedPairEqualsTheTwoLayersBitForBit) {
  // BatchNorm1d at 45 channels walks the (N, C) kernels' 32-channel blocks, 8-channel blocks
  // and single channels; BatchNorm2d at 5x5 their 16-, 8- and 1-value loops over a plane.
  for (bool two_d : {false, true}) {
    const Shape sample = two_d ? Shape{6, 5, 5} : Shape{45};
    const int64_t n = two_d ? 3 : 19;
    ExpectFusedEqualsSeparate({two_d, sample, n, true, true, true, false});    // training
    ExpectFusedEqualsSeparate({two_d, sample, n, true, true, false, false});   // eval
    ExpectFusedEqualsSeparate({two_d, sample, n, true, true, true, true});     // frozen
    ExpectFusedEqualsSeparate({two_d, sample, n, false, true, true, false});   // affine=false
    ExpectFusedEqualsSeparate({two_d, sample, n, true, false, false, false});  // untracked eval
  }
}

TEST(BatchNormReluFusionTest, OnlyABatchNormDirectlyBeforeAReluFuses) {
  BatchNormConfig c;
  c.num_features = 4;
  LayerList layers;
  layers.push_back(MakeBn(c, Shape{4}, false));
  layers.push_back(std::make_unique<Activation>(LayerKind::kLeakyReLU, 0.1f));
  layers.push_back(MakeBn(c, Shape{4}, false));
  layers.push_back(MakeBn(c, Shape{4}, false));
  layers.push_back(std::make_unique<Activation>(LayerKind::kReLU, 0.0f));
  layers.push_back(MakeBn(c, Shape{4}, false));
  Tensor x(Shape{8, 4});
  FillRandom(&x, 6);
  Tensor outs[6];
  LayerCache caches[6];
  ForwardLayers(layers, x.view(), Train(), outs, caches);
  const bool expected[6] = {false, false, false, true, false, false};
  for (int j = 0; j < 6; ++j) {
    EXPECT_EQ(caches[j].relu_fused, expected[j]) << j;
    EXPECT_EQ(outs[j].size(), expected[j] ? 0 : 32) << j;
  }
}

}  // namespace
}  // namespace normd
