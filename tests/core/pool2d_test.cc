#include "core/pool2d.h"

#include <cmath>
#include <limits>
#include <ostream>
#include <string>

#include "gtest/gtest.h"
#include "tests/core/gradcheck.h"

namespace normd {
namespace {

using testing::CheckLayerGradients;
using testing::ExpectGradientsMatch;
using testing::SpacedTensor;

Pool2dConfig Config(int64_t k, int64_t stride = 0, int64_t padding = 0) {
  Pool2dConfig c;
  c.kernel_size = k;
  c.stride = stride;
  c.padding = padding;
  return c;
}

Tensor FromValues(const Shape& shape, const std::vector<float>& values) {
  Tensor t(shape);
  EXPECT_EQ(t.size(), static_cast<int64_t>(values.size()));
  std::copy(values.begin(), values.end(), t.data());
  return t;
}

std::vector<float> Values(const Tensor& t) { return std::vector<float>(t.data(), t.data() + t.size()); }

TEST(MaxPool2dTest, KnownValuesWithDefaultStride) {
  Pool2d pool(Config(2), /*max=*/true);
  Shape out;
  ASSERT_TRUE(pool.Build(Shape{1, 4, 4}, &out).ok());
  EXPECT_EQ(out, (Shape{1, 2, 2}));  // stride defaults to kernel_size
  const Tensor x = FromValues(Shape{1, 1, 4, 4}, {1, 5, 2, 0,    //
                                                  3, 4, 8, 1,    //
                                                  -1, -2, 0, 6,  //
                                                  -3, -4, 7, 2});
  Tensor y;
  LayerCache cache;
  pool.Forward(x.view(), &y, &cache, ForwardContext{});
  ASSERT_EQ(y.shape(), (Shape{1, 1, 2, 2}));
  EXPECT_EQ(Values(y), (std::vector<float>{5, 8, -1, 7}));

  const Tensor dy = FromValues(Shape{1, 1, 2, 2}, {10, 20, 30, 40});
  Tensor dx;
  pool.Backward(x.view(), y, dy.view(), cache, ForwardContext{}, &dx);
  EXPECT_EQ(Values(dx), (std::vector<float>{0, 10, 0, 0,   //
                                            0, 0, 20, 0,   //
                                            30, 0, 0, 0,   //
                                            0, 0, 40, 0}));
}

TEST(MaxPool2dTest, TiesGoToTheFirstElementInWindowOrder) {
  Pool2d pool(Config(2), true);
  Shape out;
  ASSERT_TRUE(pool.Build(Shape{1, 2, 4}, &out).ok());
  // Window 1: all equal -> (0, 0). Window 2: max 3 at (0, 1) and (1, 0) -> (0, 1).
  const Tensor x = FromValues(Shape{1, 1, 2, 4}, {2, 2, 1, 3,  //
                                                  2, 2, 3, 3});
  Tensor y;
  LayerCache cache;
  pool.Forward(x.view(), &y, &cache, ForwardContext{});
  EXPECT_EQ(Values(y), (std::vector<float>{2, 3}));
  const Tensor dy = FromValues(Shape{1, 1, 1, 2}, {1, 1});
  Tensor dx;
  pool.Backward(x.view(), y, dy.view(), cache, ForwardContext{}, &dx);
  EXPECT_EQ(Values(dx), (std::vector<float>{1, 0, 0, 1,  //
                                            0, 0, 0, 0}));
}

TEST(MaxPool2dTest, PaddingIsMinusInfinity) {
  Pool2d pool(Config(3, 2, 1), true);
  Shape out;
  ASSERT_TRUE(pool.Build(Shape{1, 3, 3}, &out).ok());
  EXPECT_EQ(out, (Shape{1, 2, 2}));
  const Tensor x = FromValues(Shape{1, 1, 3, 3}, {-1, -2, -3,  //
                                                  -4, -5, -6,  //
                                                  -7, -8, -9});
  Tensor y;
  LayerCache cache;
  pool.Forward(x.view(), &y, &cache, ForwardContext{});
  // Zero padding would give 0 everywhere; -inf padding keeps the real maxima.
  EXPECT_EQ(Values(y), (std::vector<float>{-1, -2, -4, -5}));
}

TEST(MaxPool2dTest, OverlappingWindowsAccumulateGradient) {
  Pool2d pool(Config(2, 1), true);
  Shape out;
  ASSERT_TRUE(pool.Build(Shape{1, 3, 3}, &out).ok());
  EXPECT_EQ(out, (Shape{1, 2, 2}));
  // The centre wins all four windows.
  const Tensor x = FromValues(Shape{1, 1, 3, 3}, {0, 0, 0, 0, 9, 0, 0, 0, 0});
  Tensor y;
  LayerCache cache;
  pool.Forward(x.view(), &y, &cache, ForwardContext{});
  const Tensor dy = FromValues(Shape{1, 1, 2, 2}, {1, 2, 3, 4});
  Tensor dx(Shape{1, 1, 3, 3}, 5.0f);  // stale contents must be overwritten
  pool.Backward(x.view(), y, dy.view(), cache, ForwardContext{}, &dx);
  EXPECT_EQ(Values(dx), (std::vector<float>{0, 0, 0, 0, 10, 0, 0, 0, 0}));
}

TEST(MaxPool2dTest, NaNPropagates) {
  Pool2d pool(Config(2), true);
  Shape out;
  ASSERT_TRUE(pool.Build(Shape{1, 2, 2}, &out).ok());
  const Tensor x = FromValues(Shape{1, 1, 2, 2}, {1, std::nanf(""), 3, 2});
  Tensor y;
  LayerCache cache;
  pool.Forward(x.view(), &y, &cache, ForwardContext{});
  EXPECT_TRUE(std::isnan(y.data()[0]));
}

// 2x2 windows with stride 2 and no padding take a fast path: it must pick the same element as
// the definition (the first maximum in row-major window order, a later NaN over anything, -inf
// only when the window holds nothing larger), on odd sizes whose last row and column no window
// covers.
TEST(MaxPool2dTest, TwoByTwoFastPathMatchesTheDefinition) {
  const float inf = std::numeric_limits<float>::infinity();
  const float nan = std::nanf("");
  const float pool_of_values[] = {-inf, -1.0f, 0.0f, -0.0f, 2.0f, 2.0f, inf, nan};
  const int64_t n = 3, c = 2, h = 7, w = 9, h_out = 3, w_out = 4;
  Pool2d pool(Config(2, 2), true);
  Shape out;
  ASSERT_TRUE(pool.Build(Shape{c, h, w}, &out).ok());
  ASSERT_EQ(out, (Shape{c, h_out, w_out}));
  Tensor x(Shape{n, c, h, w});
  uint32_t state = 12345;
  for (int64_t i = 0; i < x.size(); ++i) {
    state = state * 1664525u + 1013904223u;
    x.data()[i] = pool_of_values[(state >> 24) % 8];
  }
  Tensor y;
  LayerCache cache;
  pool.Forward(x.view(), &y, &cache, ForwardContext{});
  Tensor dy(y.shape());
  for (int64_t i = 0; i < dy.size(); ++i) dy.data()[i] = static_cast<float>(i + 1);
  Tensor dx;
  pool.Backward(x.view(), y, dy.view(), cache, ForwardContext{}, &dx);

  std::vector<float> want_dx(x.size(), 0.0f);
  for (int64_t pl = 0; pl < n * c; ++pl) {
    const float* in = x.data() + pl * h * w;
    for (int64_t oh = 0; oh < h_out; ++oh) {
      for (int64_t ow = 0; ow < w_out; ++ow) {
        float best = -inf;
        int64_t at = 2 * oh * w + 2 * ow;
        for (int64_t i = 2 * oh; i < 2 * oh + 2; ++i) {
          for (int64_t j = 2 * ow; j < 2 * ow + 2; ++j) {
            const float v = in[i * w + j];
            if (v > best || std::isnan(v)) best = v, at = i * w + j;
          }
        }
        const int64_t o = (pl * h_out + oh) * w_out + ow;
        const float got = y.data()[o];
        if (std::isnan(best)) {
          EXPECT_TRUE(std::isnan(got)) << o;
        } else {
          EXPECT_EQ(got, best) << o;
          EXPECT_EQ(std::signbit(got), std::signbit(best)) << o;
        }
        want_dx[pl * h * w + at] = dy.data()[o];
      }
    }
  }
  EXPECT_EQ(Values(dx), want_dx);
}

TEST(AvgPool2dTest, KnownValuesCountPadding) {
  Pool2d pool(Config(2, 1, 1), /*max=*/false);
  Shape out;
  ASSERT_TRUE(pool.Build(Shape{1, 2, 2}, &out).ok());
  EXPECT_EQ(out, (Shape{1, 3, 3}));
  const Tensor x = FromValues(Shape{1, 1, 2, 2}, {1, 2, 3, 4});
  Tensor y;
  LayerCache cache;
  pool.Forward(x.view(), &y, &cache, ForwardContext{});
  // count_include_pad: every window divides by 4, padded zeros included.
  const std::vector<float> expected = {0.25f, 0.75f, 0.5f,  //
                                       1.0f,  2.5f,  1.5f,  //
                                       0.75f, 1.75f, 1.0f};
  ASSERT_EQ(y.size(), 9);
  for (int i = 0; i < 9; ++i) EXPECT_FLOAT_EQ(y.data()[i], expected[i]) << i;

  const Tensor dy(Shape{1, 1, 3, 3}, 1.0f);
  Tensor dx;
  pool.Backward(x.view(), y, dy.view(), cache, ForwardContext{}, &dx);
  // Each input element lies in 4 windows, each passing 1/4 of its gradient.
  for (int i = 0; i < 4; ++i) EXPECT_FLOAT_EQ(dx.data()[i], 1.0f) << i;
}

TEST(AvgPool2dTest, StrideDropsTrailingRowsAndColumns) {
  Pool2d pool(Config(2), false);
  Shape out;
  ASSERT_TRUE(pool.Build(Shape{2, 3, 5}, &out).ok());
  EXPECT_EQ(out, (Shape{2, 1, 2}));  // floor((3 - 2) / 2) + 1, floor((5 - 2) / 2) + 1
  Tensor x(Shape{1, 2, 3, 5});
  for (int64_t i = 0; i < x.size(); ++i) x.data()[i] = static_cast<float>(i);
  Tensor y;
  LayerCache cache;
  pool.Forward(x.view(), &y, &cache, ForwardContext{});
  EXPECT_EQ(Values(y), (std::vector<float>{3, 5, 18, 20}));
}

struct PoolCase {
  bool max;
  Pool2dConfig config;
  Shape sample;
};

std::string CaseName(const PoolCase& c) {
  return std::string(c.max ? "Max" : "Avg") + "k" + std::to_string(c.config.kernel_size) + "s" +
         std::to_string(c.config.stride) + "p" + std::to_string(c.config.padding) + "_" +
         std::to_string(c.sample[1]) + "x" + std::to_string(c.sample[2]);
}

void PrintTo(const PoolCase& c, std::ostream* os) { *os << CaseName(c); }

class Pool2dGradTest : public ::testing::TestWithParam<PoolCase> {};

TEST_P(Pool2dGradTest, MatchesFiniteDifferences) {
  const PoolCase& c = GetParam();
  Pool2d pool(c.config, c.max);
  Shape out;
  ASSERT_TRUE(pool.Build(c.sample, &out).ok());
  // Distinct values 0.05 apart: no window has a tie within the finite-difference step.
  const Tensor x = SpacedTensor(c.sample.WithBatch(2), 4, 0.05f);
  ExpectGradientsMatch(CheckLayerGradients(&pool, x, ForwardContext{}), CaseName(c));
}

INSTANTIATE_TEST_SUITE_P(
    Geometries, Pool2dGradTest,
    ::testing::Values(PoolCase{true, Config(2), Shape{2, 4, 4}},
                      PoolCase{true, Config(3, 2, 1), Shape{2, 5, 6}},
                      PoolCase{true, Config(3, 1, 1), Shape{1, 4, 5}},
                      PoolCase{true, Config(2), Shape{3, 5, 3}},
                      PoolCase{false, Config(2), Shape{2, 4, 4}},
                      PoolCase{false, Config(3, 2, 1), Shape{2, 5, 6}},
                      PoolCase{false, Config(3, 1, 1), Shape{1, 4, 5}},
                      PoolCase{false, Config(4, 3, 2), Shape{2, 6, 7}}),
    [](const ::testing::TestParamInfo<PoolCase>& info) { return CaseName(info.param); });

std::string BuildError(const Pool2dConfig& config, bool max, const Shape& sample) {
  Pool2d pool(config, max);
  Shape out;
  const Status s = pool.Build(sample, &out);
  EXPECT_FALSE(s.ok());
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  return s.message();
}

TEST(Pool2dTest, BuildRejectsBadShapesAndConfigs) {
  EXPECT_EQ(BuildError(Config(5), true, Shape{1, 3, 3}),
            "kernel_size 5 is larger than the padded input 3x3");
  EXPECT_EQ(BuildError(Config(5, 1, 1), false, Shape{2, 2, 7}),
            "kernel_size 5 is larger than the padded input 4x9");
  EXPECT_EQ(BuildError(Config(2), true, Shape{16}),
            "expects a 3-D per-sample input (C, H, W), got (16)");
  EXPECT_EQ(BuildError(Config(3, 1, 2), false, Shape{1, 8, 8}),
            "padding 2 must be at most half of kernel_size 3");
  EXPECT_NE(BuildError(Config(0), true, Shape{1, 8, 8}).find("kernel_size must be positive"),
            std::string::npos);
  EXPECT_NE(BuildError(Config(2, -1), true, Shape{1, 8, 8}).find("stride must be positive"),
            std::string::npos);
  EXPECT_NE(BuildError(Config(2, 1, -1), true, Shape{1, 8, 8}).find("padding"),
            std::string::npos);
}

TEST(Pool2dTest, NamesAndNoParameters) {
  Pool2d max_pool(Config(2), true), avg_pool(Config(2), false);
  EXPECT_STREQ(max_pool.kind_name(), "MaxPool2d");
  EXPECT_STREQ(avg_pool.kind_name(), "AvgPool2d");
  Shape out;
  ASSERT_TRUE(max_pool.Build(Shape{1, 4, 4}, &out).ok());
  EXPECT_EQ(max_pool.NumParameters(), 0);
  EXPECT_TRUE(max_pool.parameters().empty());
}

TEST(AdaptiveAvgPool2dTest, MeansOfEachPlane) {
  AdaptiveAvgPool2d pool;
  Shape out;
  ASSERT_TRUE(pool.Build(Shape{2, 2, 3}, &out).ok());
  EXPECT_EQ(out, (Shape{2, 1, 1}));
  EXPECT_STREQ(pool.kind_name(), "AdaptiveAvgPool2d");
  EXPECT_EQ(pool.NumParameters(), 0);
  const Tensor x = FromValues(Shape{2, 2, 2, 3}, {1, 2, 3, 4, 5, 6,         //
                                                  0, 0, 0, 0, 0, 12,        //
                                                  -1, -1, -1, -1, -1, -1,   //
                                                  0.5f, 0, 0, 0, 0, 0.25f});
  Tensor y;
  LayerCache cache;
  pool.Forward(x.view(), &y, &cache, ForwardContext{});
  ASSERT_EQ(y.shape(), (Shape{2, 2, 1, 1}));
  EXPECT_EQ(Values(y), (std::vector<float>{3.5f, 2.0f, -1.0f, 0.125f}));

  const Tensor dy = FromValues(Shape{2, 2, 1, 1}, {6, -12, 0, 3});
  Tensor dx;
  pool.Backward(x.view(), y, dy.view(), cache, ForwardContext{}, &dx);
  ASSERT_EQ(dx.shape(), x.shape());
  for (int64_t i = 0; i < 6; ++i) {
    EXPECT_EQ(dx.data()[i], 1.0f);
    EXPECT_EQ(dx.data()[6 + i], -2.0f);
    EXPECT_EQ(dx.data()[12 + i], 0.0f);
    EXPECT_EQ(dx.data()[18 + i], 0.5f);
  }
}

TEST(AdaptiveAvgPool2dTest, GradientsMatchFiniteDifferences) {
  AdaptiveAvgPool2d pool;
  ASSERT_TRUE(testing::BuildAndAllocate(&pool, Shape{3, 4, 5}, 1).ok());
  ExpectGradientsMatch(CheckLayerGradients(&pool, SpacedTensor(Shape{2, 3, 4, 5}, 2),
                                           ForwardContext{}),
                       "AdaptiveAvgPool2d");
}

TEST(AdaptiveAvgPool2dTest, NeedsAPlanarInput) {
  AdaptiveAvgPool2d pool;
  Shape out;
  const Status s = pool.Build(Shape{16}, &out);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(s.message(), "expects a 3-D per-sample input (C, H, W), got (16)");
}

}  // namespace
}  // namespace normd
