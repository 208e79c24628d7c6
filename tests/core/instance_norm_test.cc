// InstanceNorm1d/2d (core/instance_norm.h): instance statistics, the running-statistics update
// and its two phases, eval and frozen semantics, gradients against finite differences, and the
// checks. PyTorch parity lives in tests/parity/torch_parity.py.
#include "core/instance_norm.h"

#include <cmath>
#include <string>

#include "gtest/gtest.h"
#include "tests/core/gradcheck.h"

namespace normd {
namespace {

using testing::BuildAndAllocate;
using testing::CheckLayerGradients;
using testing::ExpectGradientsMatch;
using testing::RandomTensor;

InstanceNormConfig Config(int64_t c, bool affine, bool track, float momentum = 0.1f) {
  InstanceNormConfig config;
  config.num_features = c;
  config.affine = affine;
  config.track_running_stats = track;
  config.momentum = momentum;
  return config;
}

TEST(InstanceNormTest, StateDictNamesFollowPyTorch) {
  InstanceNorm plain(Config(3, false, false), false);
  ASSERT_TRUE(BuildAndAllocate(&plain, Shape{3, 4}, 1).ok());
  EXPECT_TRUE(plain.state().empty());
  InstanceNorm full(Config(3, true, true), true);
  ASSERT_TRUE(BuildAndAllocate(&full, Shape{3, 2, 2}, 1).ok());
  std::string names;
  for (const StateSlot& s : full.state()) names += s.name + " ";
  EXPECT_EQ(names, "weight bias running_mean running_var num_batches_tracked ");
  EXPECT_TRUE(full.HasRunningStats());
  EXPECT_FALSE(plain.HasRunningStats());
}

TEST(InstanceNormTest, RunningUpdateIsTheMeanOfPerInstanceUpdatesAndWaitsForCommit) {
  InstanceNorm in(Config(1, false, true, 0.5f), false);
  ASSERT_TRUE(BuildAndAllocate(&in, Shape{1, 2}, 1).ok());
  // Two instances: {0, 2} (mean 1, unbiased var 2) and {4, 8} (mean 6, unbiased var 8).
  Tensor x(Shape{2, 1, 2});
  const float values[] = {0.0f, 2.0f, 4.0f, 8.0f};
  for (int i = 0; i < 4; ++i) x.data()[i] = values[i];
  ForwardContext ctx;
  ctx.training = true;
  ctx.update_running_stats = true;
  Tensor y;
  LayerCache cache;
  in.Forward(x.view(), &y, &cache, ctx);
  ASSERT_TRUE(cache.has_pending_update);
  EXPECT_EQ(in.running_mean().data()[0], 0.0f);  // nothing before the commit
  in.ApplyPendingUpdate(&cache);
  EXPECT_FLOAT_EQ(in.running_mean().data()[0], 0.5f * 0.0f + 0.5f * 3.5f);
  EXPECT_FLOAT_EQ(in.running_var().data()[0], 0.5f * 1.0f + 0.5f * 5.0f);
  EXPECT_FALSE(cache.has_pending_update);
  // Instance statistics normalise: each instance becomes (-1, 1) up to eps.
  EXPECT_NEAR(y.data()[0], -1.0f, 1e-4);
  EXPECT_NEAR(y.data()[3], 1.0f, 1e-4);
  in.ResetRunningStats();
  EXPECT_EQ(in.running_mean().data()[0], 0.0f);
  EXPECT_EQ(in.running_var().data()[0], 1.0f);
}

TEST(InstanceNormTest, EvalAndFrozenNormaliseWithRunningStatistics) {
  InstanceNorm in(Config(1, false, true), false);
  ASSERT_TRUE(BuildAndAllocate(&in, Shape{1, 2}, 1).ok());
  Tensor x(Shape{1, 1, 2});
  x.data()[0] = 3.0f;
  x.data()[1] = 5.0f;
  const float s = static_cast<float>(1.0 / std::sqrt(1.0 + 1e-5));
  for (bool frozen : {false, true}) {
    in.set_frozen(frozen);
    ForwardContext ctx;
    ctx.training = frozen;  // frozen: eval semantics inside a train-mode model
    ctx.update_running_stats = frozen;
    Tensor y;
    LayerCache cache;
    in.Forward(x.view(), &y, &cache, ctx);
    EXPECT_FALSE(cache.has_pending_update);
    EXPECT_NEAR(y.data()[0], 3.0f * s, 1e-6) << "frozen " << frozen;
    EXPECT_NEAR(y.data()[1], 5.0f * s, 1e-6) << "frozen " << frozen;
  }
}

struct GradCase {
  bool two_d;
  Shape sample;
  bool affine;
  bool track;
  bool training;
};

std::string Name(const GradCase& c) {
  return std::string(c.two_d ? "2d" : "1d") + (c.affine ? "_affine" : "_plain") +
         (c.track ? "_track" : "_notrack") + (c.training ? "_train" : "_eval");
}

class InstanceNormGradTest : public ::testing::TestWithParam<GradCase> {};

TEST_P(InstanceNormGradTest, MatchesFiniteDifferences) {
  const GradCase& c = GetParam();
  InstanceNorm in(Config(c.sample[0], c.affine, c.track), c.two_d);
  ASSERT_TRUE(BuildAndAllocate(&in, c.sample, 1).ok());
  uint64_t seed = 50;
  for (const StateSlot& s : in.state()) {
    if (s.tensor != nullptr) *s.tensor = RandomTensor(s.tensor->shape(), ++seed, 0.5f, 1.5f);
  }
  const Tensor x = RandomTensor(c.sample.WithBatch(3), 13, -2.0f, 2.0f);
  ForwardContext ctx;
  ctx.training = c.training;
  ExpectGradientsMatch(CheckLayerGradients(&in, x, ctx), "InstanceNorm_" + Name(c));
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, InstanceNormGradTest,
    ::testing::Values(GradCase{false, Shape{3, 5}, true, false, true},
                      GradCase{false, Shape{3, 5}, false, true, true},
                      GradCase{false, Shape{3, 5}, true, true, false},
                      GradCase{true, Shape{2, 3, 4}, true, true, true},
                      GradCase{true, Shape{2, 3, 4}, true, true, false},
                      GradCase{true, Shape{2, 3, 4}, false, false, false}),
    [](const ::testing::TestParamInfo<GradCase>& info) { return Name(info.param); });

TEST(InstanceNormTest, ChecksShapesAndOneSpatialValue) {
  Shape out;
  InstanceNorm flat(Config(4, false, false), false);
  Status s = flat.Build(Shape{4}, &out);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(s.message(), "expects a 2-D per-sample input (C, L), got (4)");
  InstanceNorm mismatch(Config(4, false, false), true);
  s = mismatch.Build(Shape{3, 2, 2}, &out);
  EXPECT_EQ(s.message(), "num_features is 4 but the previous layer produces 3 channels");

  InstanceNorm tracked(Config(2, false, true), true);
  ASSERT_TRUE(BuildAndAllocate(&tracked, Shape{2, 1, 1}, 1).ok());
  ForwardContext train;
  train.training = true;
  s = tracked.CheckBatch(Shape{8, 2, 1, 1}, train);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("Expected more than 1 spatial element when training"),
            std::string::npos);
  EXPECT_TRUE(tracked.CheckBatch(Shape{8, 2, 1, 1}, ForwardContext{}).ok());  // eval: running
}

}  // namespace
}  // namespace normd
