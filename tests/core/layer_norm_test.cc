#include "core/layer_norm.h"

#include <cmath>
#include <ostream>
#include <string>

#include "gtest/gtest.h"
#include "tests/core/gradcheck.h"

namespace normd {
namespace {

using testing::BuildAndAllocate;
using testing::CheckLayerGradients;
using testing::ExpectGradientsMatch;
using testing::RandomTensor;

LayerNormConfig Config(std::vector<int64_t> normalized_shape, bool affine = true,
                       float eps = 1e-5f) {
  LayerNormConfig c;
  c.normalized_shape = std::move(normalized_shape);
  c.elementwise_affine = affine;
  c.eps = eps;
  return c;
}

TEST(LayerNormTest, KnownRow) {
  LayerNorm ln(Config({4}));
  ASSERT_TRUE(BuildAndAllocate(&ln, Shape{4}, 1).ok());
  Tensor x(Shape{1, 4});
  const float in[4] = {1, 2, 3, 4};
  std::copy(in, in + 4, x.data());
  Tensor y;
  LayerCache cache;
  ln.Forward(x.view(), &y, &cache, ForwardContext{});
  // mean 2.5, biased variance 1.25.
  const double rstd = 1.0 / std::sqrt(1.25 + 1e-5);
  for (int i = 0; i < 4; ++i) EXPECT_NEAR(y.data()[i], (in[i] - 2.5) * rstd, 1e-6) << i;
}

TEST(LayerNormTest, AffineScalesAndShiftsPerElement) {
  LayerNorm ln(Config({3}));
  ASSERT_TRUE(BuildAndAllocate(&ln, Shape{3}, 1).ok());
  std::vector<Parameter*> params = ln.parameters();
  ASSERT_EQ(params.size(), 2u);
  const float w[3] = {2.0f, -1.0f, 0.5f}, b[3] = {0.0f, 1.0f, -3.0f};
  std::copy(w, w + 3, params[0]->value.data());
  std::copy(b, b + 3, params[1]->value.data());
  Tensor x(Shape{2, 3});
  const float in[6] = {0, 3, 6, 5, 5, 8};
  std::copy(in, in + 6, x.data());
  Tensor y;
  LayerCache cache;
  ln.Forward(x.view(), &y, &cache, ForwardContext{});
  // Row 0: mean 3, var 6. Row 1: mean 6, var 2.
  const double means[2] = {3, 6}, vars[2] = {6, 2};
  for (int r = 0; r < 2; ++r) {
    for (int j = 0; j < 3; ++j) {
      const double xhat = (in[r * 3 + j] - means[r]) / std::sqrt(vars[r] + 1e-5);
      EXPECT_NEAR(y.data()[r * 3 + j], xhat * w[j] + b[j], 1e-5) << r << " " << j;
    }
  }
}

TEST(LayerNormTest, NormalisesEachSampleOverTrailingDims) {
  // (C, H, W) = (2, 3, 4) normalised over (3, 4): each (sample, channel) plane separately.
  LayerNorm ln(Config({3, 4}, /*affine=*/false));
  Shape out;
  ASSERT_TRUE(BuildAndAllocate(&ln, Shape{2, 3, 4}, 1, &out).ok());
  EXPECT_EQ(out, (Shape{2, 3, 4}));
  Tensor x = RandomTensor(Shape{3, 2, 3, 4}, 2, -4.0f, 9.0f);
  Tensor y;
  LayerCache cache;
  ln.Forward(x.view(), &y, &cache, ForwardContext{});
  for (int64_t plane = 0; plane < 6; ++plane) {
    double sum = 0.0, sum2 = 0.0;
    for (int64_t i = 0; i < 12; ++i) {
      const double v = y.data()[plane * 12 + i];
      sum += v;
      sum2 += v * v;
    }
    EXPECT_NEAR(sum / 12, 0.0, 1e-6) << plane;
    EXPECT_NEAR(sum2 / 12, 1.0, 1e-4) << plane;  // biased variance 1 (up to eps)
  }
}

TEST(LayerNormTest, ParametersInitialisedToIdentity) {
  LayerNorm ln(Config({2, 3}));
  ASSERT_TRUE(BuildAndAllocate(&ln, Shape{5, 2, 3}, 1).ok());
  EXPECT_EQ(ln.NumParameters(), 12);
  std::vector<Parameter*> params = ln.parameters();
  ASSERT_EQ(params.size(), 2u);
  EXPECT_EQ(params[0]->name, "weight");
  EXPECT_EQ(params[1]->name, "bias");
  for (Parameter* p : params) {
    EXPECT_EQ(p->value.shape(), (Shape{2, 3}));
    EXPECT_EQ(p->grad.shape(), (Shape{2, 3}));
    for (int64_t i = 0; i < 6; ++i) {
      EXPECT_EQ(p->value.data()[i], p == params[0] ? 1.0f : 0.0f);
      EXPECT_EQ(p->grad.data()[i], 0.0f);
    }
  }
  LayerNorm plain(Config({3}, false));
  ASSERT_TRUE(BuildAndAllocate(&plain, Shape{3}, 1).ok());
  EXPECT_EQ(plain.NumParameters(), 0);
  EXPECT_TRUE(plain.parameters().empty());
}

struct LayerNormCase {
  std::vector<int64_t> normalized_shape;
  Shape sample;
  bool affine;
  bool training;
};

std::string CaseName(const LayerNormCase& c) {
  std::string s = "n";
  for (int64_t d : c.normalized_shape) s += std::to_string(d) + "_";
  s += "in";
  for (int64_t d : c.sample) s += std::to_string(d) + "_";
  return s + (c.affine ? "affine" : "plain") + (c.training ? "_train" : "_eval");
}

void PrintTo(const LayerNormCase& c, std::ostream* os) { *os << CaseName(c); }

class LayerNormGradTest : public ::testing::TestWithParam<LayerNormCase> {};

TEST_P(LayerNormGradTest, MatchesFiniteDifferences) {
  const LayerNormCase& c = GetParam();
  LayerNorm ln(Config(c.normalized_shape, c.affine));
  ASSERT_TRUE(BuildAndAllocate(&ln, c.sample, 1).ok());
  // Non-trivial affine parameters, so their gradients and the input gradient's dependence on
  // them are exercised.
  uint64_t seed = 30;
  for (Parameter* p : ln.parameters()) p->value = RandomTensor(p->value.shape(), ++seed, 0.5f, 1.5f);
  const Tensor x = RandomTensor(c.sample.WithBatch(3), 9, -2.0f, 2.0f);
  ForwardContext ctx;
  ctx.training = c.training;
  ExpectGradientsMatch(CheckLayerGradients(&ln, x, ctx), "LayerNorm_" + CaseName(c));
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, LayerNormGradTest,
    ::testing::Values(LayerNormCase{{6}, Shape{6}, true, true},
                      LayerNormCase{{6}, Shape{6}, true, false},
                      LayerNormCase{{6}, Shape{6}, false, true},
                      LayerNormCase{{6}, Shape{6}, false, false},
                      LayerNormCase{{5}, Shape{3, 5}, true, true},
                      LayerNormCase{{3, 4}, Shape{2, 3, 4}, true, true},
                      LayerNormCase{{3, 4}, Shape{2, 3, 4}, false, false},
                      LayerNormCase{{2, 3, 4}, Shape{2, 3, 4}, true, false}),
    [](const ::testing::TestParamInfo<LayerNormCase>& info) { return CaseName(info.param); });

std::string BuildError(const LayerNormConfig& config, const Shape& sample) {
  LayerNorm ln(config);
  Shape out;
  const Status s = ln.Build(sample, &out);
  EXPECT_FALSE(s.ok());
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  return s.message();
}

TEST(LayerNormTest, BuildRejectsShapeMismatch) {
  EXPECT_EQ(BuildError(Config({5}), Shape{4}),
            "normalized_shape is (5) but the per-sample input's trailing dimensions are (4)");
  EXPECT_EQ(BuildError(Config({3, 4}), Shape{2, 4, 3}),
            "normalized_shape is (3, 4) but the per-sample input's trailing dimensions are "
            "(4, 3)");
  EXPECT_EQ(BuildError(Config({2, 3, 4}), Shape{3, 4}),
            "normalized_shape (2, 3, 4) has more dimensions than the per-sample input (3, 4)");
  EXPECT_EQ(BuildError(Config({}), Shape{4}), "normalized_shape must not be empty");
  EXPECT_NE(BuildError(Config({0}), Shape{0}).find("positive"), std::string::npos);
  EXPECT_NE(BuildError(Config({4}, true, -1.0f), Shape{4}).find("eps"), std::string::npos);
}

}  // namespace
}  // namespace normd
