// GroupNorm (core/group_norm.h): known values, gradients against finite differences, the
// configuration and batch checks. PyTorch parity lives in tests/parity/torch_parity.py.
#include "core/group_norm.h"

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

GroupNormConfig Config(int64_t groups, int64_t channels, bool affine = true) {
  GroupNormConfig c;
  c.num_groups = groups;
  c.num_channels = channels;
  c.affine = affine;
  return c;
}

TEST(GroupNormTest, NormalisesEachSampleGroupOverItsChannelsAndPositions) {
  // (N=2, C=4, L=2), 2 groups: each sample's group is 2 channels x 2 positions = 4 values.
  GroupNorm gn(Config(2, 4, false));
  ASSERT_TRUE(BuildAndAllocate(&gn, Shape{4, 2}, 1).ok());
  Tensor x(Shape{2, 4, 2});
  for (int64_t i = 0; i < x.size(); ++i) x.data()[i] = static_cast<float>(i * i % 7);
  Tensor y;
  LayerCache cache;
  gn.Forward(x.view(), &y, &cache, ForwardContext{});
  for (int64_t block = 0; block < 4; ++block) {
    double mean = 0.0, var = 0.0;
    for (int i = 0; i < 4; ++i) mean += x.data()[block * 4 + i] / 4.0;
    for (int i = 0; i < 4; ++i) {
      const double d = x.data()[block * 4 + i] - mean;
      var += d * d / 4.0;
    }
    for (int i = 0; i < 4; ++i) {
      const double want = (x.data()[block * 4 + i] - mean) / std::sqrt(var + 1e-5);
      EXPECT_NEAR(y.data()[block * 4 + i], want, 1e-5) << "block " << block << " value " << i;
    }
  }
}

TEST(GroupNormTest, AffineIsPerChannel) {
  GroupNorm gn(Config(1, 2));
  ASSERT_TRUE(BuildAndAllocate(&gn, Shape{2, 2}, 1).ok());
  ASSERT_EQ(gn.parameters().size(), 2u);
  gn.parameters()[0]->value.data()[1] = 3.0f;  // weight of channel 1
  gn.parameters()[1]->value.data()[0] = 5.0f;  // bias of channel 0
  Tensor x(Shape{1, 2, 2});
  const float values[] = {1.0f, 3.0f, 1.0f, 3.0f};  // mean 2, var 1
  for (int i = 0; i < 4; ++i) x.data()[i] = values[i];
  Tensor y;
  LayerCache cache;
  gn.Forward(x.view(), &y, &cache, ForwardContext{});
  const float s = static_cast<float>(1.0 / std::sqrt(1.0 + 1e-5));
  EXPECT_NEAR(y.data()[0], 5.0f - s, 1e-5);
  EXPECT_NEAR(y.data()[1], 5.0f + s, 1e-5);
  EXPECT_NEAR(y.data()[2], -3.0f * s, 1e-5);
  EXPECT_NEAR(y.data()[3], 3.0f * s, 1e-5);
}

struct GradCase {
  int64_t groups;
  Shape sample;
  bool affine;
};

class GroupNormGradTest : public ::testing::TestWithParam<GradCase> {};

TEST_P(GroupNormGradTest, MatchesFiniteDifferences) {
  const GradCase& c = GetParam();
  GroupNorm gn(Config(c.groups, c.sample[0], c.affine));
  ASSERT_TRUE(BuildAndAllocate(&gn, c.sample, 1).ok());
  uint64_t seed = 40;
  for (Parameter* p : gn.parameters()) p->value = RandomTensor(p->value.shape(), ++seed, 0.5f, 1.5f);
  const Tensor x = RandomTensor(c.sample.WithBatch(3), 11, -2.0f, 2.0f);
  ForwardContext ctx;
  ctx.training = true;
  ExpectGradientsMatch(CheckLayerGradients(&gn, x, ctx),
                       "GroupNorm_g" + std::to_string(c.groups) + "_" + c.sample.ToString());
}

INSTANTIATE_TEST_SUITE_P(Shapes, GroupNormGradTest,
                         ::testing::Values(GradCase{2, Shape{4, 3, 2}, true},
                                           GradCase{1, Shape{4, 3, 2}, false},
                                           GradCase{4, Shape{4, 5}, true},
                                           GradCase{2, Shape{6}, true}));  // groups of 3: with 2 values dx is O(eps)

TEST(GroupNormTest, BuildChecksTheConfiguration) {
  Shape out;
  GroupNorm indivisible(Config(3, 4));
  Status s = indivisible.Build(Shape{4, 2}, &out);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(s.message(), "num_channels (4) must be divisible by num_groups (3)");
  GroupNorm mismatch(Config(2, 4));
  s = mismatch.Build(Shape{6, 2}, &out);
  EXPECT_EQ(s.message(), "num_channels is 4 but the previous layer produces 6 channels");
}

TEST(GroupNormTest, OneValuePerGroupAcrossTheBatchIsPyTorchsError) {
  GroupNorm gn(Config(4, 4));
  ASSERT_TRUE(BuildAndAllocate(&gn, Shape{4}, 1).ok());
  ForwardContext eval;
  const Status s = gn.CheckBatch(Shape{1, 4}, eval);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("Expected more than 1 value per channel"), std::string::npos);
  EXPECT_TRUE(gn.CheckBatch(Shape{2, 4}, eval).ok());
}

}  // namespace
}  // namespace normd
