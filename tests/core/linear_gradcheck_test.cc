// Finite-difference gradient checks of Linear, with and without bias.
#include "core/linear.h"

#include "gtest/gtest.h"
#include "tests/core/gradcheck.h"

namespace normd {
namespace {

using testing::BuildAndAllocate;
using testing::CheckLayerGradients;
using testing::ExpectGradientsMatch;
using testing::RandomTensor;

class LinearGradTest : public ::testing::TestWithParam<bool> {};

TEST_P(LinearGradTest, MatchesFiniteDifferences) {
  const bool bias = GetParam();
  LinearConfig config;
  config.in_features = 5;
  config.out_features = 4;
  config.bias = bias;
  Linear linear(config);
  Shape out;
  ASSERT_TRUE(BuildAndAllocate(&linear, Shape{5}, 3, &out).ok());
  EXPECT_EQ(out, (Shape{4}));
  ASSERT_EQ(linear.parameters().size(), bias ? 2u : 1u);
  const Tensor x = RandomTensor(Shape{3, 5}, 4, -2.0f, 2.0f);
  ForwardContext ctx;
  ctx.training = true;
  ExpectGradientsMatch(CheckLayerGradients(&linear, x, ctx),
                       bias ? "Linear_bias" : "Linear_nobias");
}

INSTANTIATE_TEST_SUITE_P(Bias, LinearGradTest, ::testing::Bool(),
                         [](const ::testing::TestParamInfo<bool>& info) {
                           return info.param ? "WithBias" : "WithoutBias";
                         });

TEST(LinearGradTest, LargerLayerSampled) {
  LinearConfig config;
  config.in_features = 40;
  config.out_features = 30;
  Linear linear(config);
  ASSERT_TRUE(BuildAndAllocate(&linear, Shape{40}, 5).ok());
  const Tensor x = RandomTensor(Shape{8, 40}, 6, -1.0f, 1.0f);
  ExpectGradientsMatch(CheckLayerGradients(&linear, x, ForwardContext{}), "Linear_40x30");
}

}  // namespace
}  // namespace normd
