// core/loss: values of the losses against their definitions, and the label_smoothing rules.
#include "core/loss.h"

#include <gtest/gtest.h>

#include <cmath>
#include <vector>

namespace normd {
namespace {

Targets LabelTargets(const std::vector<int64_t>& labels) {
  Targets t;
  t.labels = labels.data();
  t.num_labels = static_cast<int64_t>(labels.size());
  return t;
}

// F.cross_entropy(z, y, label_smoothing=eps) from its definition: the target distribution is
// (1 - eps) one-hot + eps / K uniform, the loss its cross-entropy with softmax(z), averaged.
double SmoothedCrossEntropy(const std::vector<double>& z, int64_t k,
                            const std::vector<int64_t>& labels, double eps) {
  const int64_t n = static_cast<int64_t>(labels.size());
  double total = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    double sum = 0.0;
    for (int64_t j = 0; j < k; ++j) sum += std::exp(z[i * k + j]);
    for (int64_t j = 0; j < k; ++j) {
      const double q = (j == labels[i] ? 1.0 - eps : 0.0) + eps / static_cast<double>(k);
      total -= q * (z[i * k + j] - std::log(sum));
    }
  }
  return total / static_cast<double>(n);
}

TEST(LossTest, LabelSmoothingMatchesTheSmoothedTargetDistribution) {
  const std::vector<double> z = {1.5, -0.5, 0.25, 2.0, 0.0, -1.0, 0.5, 0.5, 3.0};
  const std::vector<float> zf(z.begin(), z.end());
  const std::vector<int64_t> labels = {0, 2, 1};
  const ConstTensorView view{zf.data(), Shape{3, 3}};
  for (double eps : {0.0, 0.1, 0.3, 0.99}) {
    Tensor grad;
    const double loss = ComputeLoss(LossKind::kCrossEntropy, view, LabelTargets(labels), &grad,
                                    eps);
    EXPECT_NEAR(loss, SmoothedCrossEntropy(z, 3, labels, eps), 1e-12) << "eps " << eps;
    // dloss/dz = (softmax(z) - q) / N with q the smoothed target, element by element.
    for (int i = 0; i < 3; ++i) {
      double sum = 0.0;
      for (int j = 0; j < 3; ++j) sum += std::exp(z[i * 3 + j]);
      for (int j = 0; j < 3; ++j) {
        const double q = (j == labels[i] ? 1.0 - eps : 0.0) + eps / 3.0;
        const double want = (std::exp(z[i * 3 + j]) / sum - q) / 3.0;
        EXPECT_NEAR(grad.data()[i * 3 + j], want, 1e-7)
            << "eps " << eps << " [" << i << "," << j << "]";
      }
    }
  }
  // Smoothing penalises a confident, correct prediction (what it is for).
  const std::vector<float> confident = {12.0f, 0.0f, 0.0f};
  const std::vector<int64_t> first = {0};
  const ConstTensorView one{confident.data(), Shape{1, 3}};
  EXPECT_GT(ComputeLoss(LossKind::kCrossEntropy, one, LabelTargets(first), nullptr, 0.1),
            ComputeLoss(LossKind::kCrossEntropy, one, LabelTargets(first), nullptr) + 0.5);
}

TEST(LossTest, LabelSmoothingOfTheUniformPredictionIsLogK) {
  // softmax(0) is uniform: -log p = log K for every class, whatever the smoothing.
  const std::vector<float> z(2 * 4, 0.0f);
  const std::vector<int64_t> labels = {3, 1};
  const double loss = ComputeLoss(LossKind::kCrossEntropy, ConstTensorView{z.data(), Shape{2, 4}},
                                  LabelTargets(labels), nullptr, 0.4);
  EXPECT_NEAR(loss, std::log(4.0), 1e-12);
}

TEST(LossTest, LabelSmoothingRules) {
  EXPECT_TRUE(ValidateLabelSmoothing(LossKind::kCrossEntropy, 0.0).ok());
  EXPECT_TRUE(ValidateLabelSmoothing(LossKind::kCrossEntropy, 0.999).ok());
  EXPECT_TRUE(ValidateLabelSmoothing(LossKind::kMse, 0.0).ok());
  for (double bad : {-0.1, 1.0, 1.5, std::nan(""), HUGE_VAL}) {
    const Status s = ValidateLabelSmoothing(LossKind::kCrossEntropy, bad);
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << bad;
    EXPECT_NE(s.message().find("label_smoothing must be in [0, 1)"), std::string::npos)
        << s.message();
  }
  const Status s = ValidateLabelSmoothing(LossKind::kBceWithLogits, 0.1);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("cross-entropy only"), std::string::npos) << s.message();
}

}  // namespace
}  // namespace normd
