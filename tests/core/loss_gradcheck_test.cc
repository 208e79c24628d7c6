// Finite-difference checks of the gradients ComputeLoss writes, for every loss.
#include "core/loss.h"

#include "gtest/gtest.h"
#include "tests/core/gradcheck.h"

namespace normd {
namespace {

using testing::CheckLossGradient;
using testing::ExpectGradientsMatch;
using testing::RandomTensor;

TEST(LossGradTest, CrossEntropy) {
  const Tensor logits = RandomTensor(Shape{5, 4}, 1, -3.0f, 3.0f);
  const std::vector<int64_t> labels = {0, 3, 1, 1, 2};
  Targets t;
  t.labels = labels.data();
  t.num_labels = static_cast<int64_t>(labels.size());
  ASSERT_TRUE(ValidateTargets(LossKind::kCrossEntropy, logits.shape(), t).ok());
  ExpectGradientsMatch(CheckLossGradient(LossKind::kCrossEntropy, logits, t), "CrossEntropy");
}

TEST(LossGradTest, CrossEntropyLargeLogits) {
  // Logits far beyond exp's float range: the log-sum-exp must stay stable.
  Tensor logits = RandomTensor(Shape{3, 3}, 2, -2.0f, 2.0f);
  logits.data()[0] += 200.0f;
  logits.data()[4] -= 150.0f;
  const std::vector<int64_t> labels = {1, 1, 2};
  Targets t;
  t.labels = labels.data();
  t.num_labels = 3;
  ExpectGradientsMatch(CheckLossGradient(LossKind::kCrossEntropy, logits, t),
                       "CrossEntropy_large");
}

TEST(LossGradTest, CrossEntropyWithLabelSmoothing) {
  const Tensor logits = RandomTensor(Shape{6, 5}, 11, -3.0f, 3.0f);
  const std::vector<int64_t> labels = {4, 0, 2, 2, 1, 3};
  Targets t;
  t.labels = labels.data();
  t.num_labels = static_cast<int64_t>(labels.size());
  for (double eps : {0.1, 0.5, 0.9}) {
    ExpectGradientsMatch(CheckLossGradient(LossKind::kCrossEntropy, logits, t, {}, eps),
                         "CrossEntropy_label_smoothing_" + std::to_string(eps));
  }
}

TEST(LossGradTest, Mse) {
  const Tensor out = RandomTensor(Shape{4, 3}, 3, -2.0f, 2.0f);
  const Tensor target = RandomTensor(Shape{4, 3}, 4, -2.0f, 2.0f);
  Targets t;
  t.target = target.view();
  ASSERT_TRUE(ValidateTargets(LossKind::kMse, out.shape(), t).ok());
  ExpectGradientsMatch(CheckLossGradient(LossKind::kMse, out, t), "MSE");
}

TEST(LossGradTest, MseOnFourDimensionalOutput) {
  const Tensor out = RandomTensor(Shape{2, 2, 3, 2}, 5, -1.0f, 1.0f);
  const Tensor target = RandomTensor(out.shape(), 6, -1.0f, 1.0f);
  Targets t;
  t.target = target.view();
  ExpectGradientsMatch(CheckLossGradient(LossKind::kMse, out, t), "MSE_4d");
}

TEST(LossGradTest, BceWithLogits) {
  const Tensor out = RandomTensor(Shape{4, 3}, 7, -4.0f, 4.0f);
  Tensor target = RandomTensor(Shape{4, 3}, 8, 0.0f, 1.0f);
  target.data()[0] = 0.0f;  // hard labels as well as soft ones
  target.data()[1] = 1.0f;
  Targets t;
  t.target = target.view();
  ASSERT_TRUE(ValidateTargets(LossKind::kBceWithLogits, out.shape(), t).ok());
  ExpectGradientsMatch(CheckLossGradient(LossKind::kBceWithLogits, out, t), "BCEWithLogits");
}

TEST(LossGradTest, BceWithLogitsExtremeLogits) {
  Tensor out = RandomTensor(Shape{2, 3}, 9, -1.0f, 1.0f);
  out.data()[0] = 60.0f;
  out.data()[1] = -60.0f;
  const Tensor target = RandomTensor(out.shape(), 10, 0.0f, 1.0f);
  Targets t;
  t.target = target.view();
  ExpectGradientsMatch(CheckLossGradient(LossKind::kBceWithLogits, out, t),
                       "BCEWithLogits_extreme");
}

}  // namespace
}  // namespace normd
