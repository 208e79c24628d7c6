// core/clip_grad: clip_grad_norm_ (norm type 2) on hand-computed gradients.
#include "core/clip_grad.h"

#include <gtest/gtest.h>

#include <cmath>

namespace normd {
namespace {

Parameter Param(std::vector<float> grad) {
  Parameter p;
  p.name = "weight";
  const Shape shape{static_cast<int64_t>(grad.size())};
  p.value = Tensor(shape, 0.0f);
  p.grad = Tensor(shape, 0.0f);
  std::copy(grad.begin(), grad.end(), p.grad.data());
  return p;
}

TEST(ClipGradTest, NormIsOverAllGradientsAsOneVector) {
  Parameter a = Param({3.0f, 0.0f}), b = Param({0.0f, 4.0f, 0.0f, 0.0f, 0.0f});
  std::vector<Parameter*> ps = {&a, &b};
  EXPECT_DOUBLE_EQ(GradNorm(ps, {true, true}), 5.0);
  EXPECT_DOUBLE_EQ(GradNorm(ps, {true, false}), 3.0);  // an excluded (untrainable) parameter
  EXPECT_DOUBLE_EQ(GradNorm(ps, {false, false}), 0.0);
}

TEST(ClipGradTest, ScalesToMaxNormOverNormPlusEps) {
  Parameter a = Param({3.0f, 0.0f}), b = Param({0.0f, 4.0f, 0.0f});
  std::vector<Parameter*> ps = {&a, &b};
  const double total = ClipGradNorm(ps, {true, true}, 1.0);
  EXPECT_DOUBLE_EQ(total, 5.0);  // the norm before clipping
  const double coef = 1.0 / (5.0 + 1e-6);
  EXPECT_NEAR(a.grad.data()[0], 3.0 * coef, 1e-7);
  EXPECT_NEAR(b.grad.data()[1], 4.0 * coef, 1e-7);
  // The clipped norm is max_norm * norm / (norm + 1e-6): just under max_norm.
  const double after = GradNorm(ps, {true, true});
  EXPECT_LT(after, 1.0);
  EXPECT_NEAR(after, 1.0, 1e-6);
}

TEST(ClipGradTest, BelowMaxNormLeavesGradientsAlone) {
  Parameter a = Param({0.3f, -0.4f});
  std::vector<Parameter*> ps = {&a};
  // A norm of 0.5 under a max_norm of 0.5: the coefficient 0.5 / (0.5 + 1e-6) is below 1, so
  // even this is scaled, as in torch; a max_norm of 1 is not.
  EXPECT_NEAR(ClipGradNorm(ps, {true}, 1.0), 0.5, 1e-7);
  EXPECT_EQ(a.grad.data()[0], 0.3f);
  EXPECT_EQ(a.grad.data()[1], -0.4f);
  ClipGradNorm(ps, {true}, 0.5);
  EXPECT_LT(a.grad.data()[0], 0.3f);
}

TEST(ClipGradTest, ExcludedParametersAreNeitherCountedNorScaled) {
  Parameter a = Param({6.0f, 8.0f}), frozen = Param({100.0f});
  std::vector<Parameter*> ps = {&a, &frozen};
  EXPECT_DOUBLE_EQ(ClipGradNorm(ps, {true, false}, 5.0), 10.0);
  EXPECT_NEAR(a.grad.data()[0], 6.0 * 5.0 / (10.0 + 1e-6), 1e-6);
  EXPECT_EQ(frozen.grad.data()[0], 100.0f);
}

TEST(ClipGradTest, LongGradientsUseEveryElement) {
  // 4-way partial sums plus a tail: 1003 elements of 1 have norm sqrt(1003).
  Parameter a = Param(std::vector<float>(1003, 1.0f));
  std::vector<Parameter*> ps = {&a};
  EXPECT_NEAR(GradNorm(ps, {true}), std::sqrt(1003.0), 1e-12);
}

}  // namespace
}  // namespace normd
