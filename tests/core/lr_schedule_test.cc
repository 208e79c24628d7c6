// core/lr_schedule: each schedule against PyTorch's documented values and closed forms, the
// warm-up composition (SequentialLR), and the validation rules.
#include "core/lr_schedule.h"

#include <gtest/gtest.h>

#include <cmath>
#include <string>

namespace normd {
namespace {

using Decay = LrScheduleConfig::Decay;

double Lr(double base, const LrScheduleConfig& s, int64_t t) {
  EXPECT_TRUE(ValidateLrSchedule(s).ok());
  return ScheduledLearningRate(base, s, t);
}

TEST(LrScheduleTest, NoScheduleIsTheBaseRate) {
  LrScheduleConfig s;
  EXPECT_FALSE(s.active());
  for (int64_t t : {0, 1, 1000000}) EXPECT_EQ(Lr(0.05, s, t), 0.05);
}

TEST(LrScheduleTest, LinearWarmupIsLinearLR) {
  // torch.optim.lr_scheduler.LinearLR's docstring: lr 0.05, start_factor 0.5, total_iters 4.
  LrScheduleConfig s;
  s.warmup_steps = 4;
  s.warmup_start_factor = 0.5;
  EXPECT_TRUE(s.active());
  const double want[] = {0.025, 0.03125, 0.0375, 0.04375, 0.05, 0.05, 0.05};
  for (int t = 0; t < 7; ++t) EXPECT_NEAR(Lr(0.05, s, t), want[t], 1e-15) << "t " << t;
}

TEST(LrScheduleTest, StepDecayIsStepLR) {
  // StepLR's docstring: lr 0.05, step_size 30, gamma 0.1.
  LrScheduleConfig s;
  s.decay = Decay::kStep;
  s.step_size = 30;
  s.gamma = 0.1;
  EXPECT_EQ(Lr(0.05, s, 0), 0.05);
  EXPECT_EQ(Lr(0.05, s, 29), 0.05);
  EXPECT_NEAR(Lr(0.05, s, 30), 0.005, 1e-17);
  EXPECT_NEAR(Lr(0.05, s, 59), 0.005, 1e-17);
  EXPECT_NEAR(Lr(0.05, s, 60), 0.0005, 1e-18);
  EXPECT_NEAR(Lr(0.05, s, 90), 0.00005, 1e-19);
  s.gamma = 0.0;  // allowed, as in torch: the rate drops to 0 at the first milestone
  EXPECT_EQ(Lr(0.05, s, 30), 0.0);
}

TEST(LrScheduleTest, CosineIsCosineAnnealingLRIncludingItsRiseAfterTMax) {
  LrScheduleConfig s;
  s.decay = Decay::kCosine;
  s.t_max = 10;
  s.eta_min = 0.001;
  EXPECT_DOUBLE_EQ(Lr(0.1, s, 0), 0.1);
  EXPECT_DOUBLE_EQ(Lr(0.1, s, 5), 0.001 + 0.099 * 0.5);
  EXPECT_DOUBLE_EQ(Lr(0.1, s, 10), 0.001);
  // PyTorch's closed form (and its recursive one) is periodic: it rises again after T_max.
  EXPECT_DOUBLE_EQ(Lr(0.1, s, 15), 0.001 + 0.099 * 0.5);
  EXPECT_DOUBLE_EQ(Lr(0.1, s, 20), 0.1);
  for (int t = 0; t <= 10; ++t) {
    const double want = 0.001 + 0.099 * (1 + std::cos(M_PI * t / 10)) / 2;
    EXPECT_NEAR(Lr(0.1, s, t), want, 1e-16) << "t " << t;
    if (t > 0) {
      EXPECT_LT(Lr(0.1, s, t), Lr(0.1, s, t - 1));
    }
  }
}

TEST(LrScheduleTest, WarmupThenCosineIsSequentialLR) {
  // SequentialLR([LinearLR(0.1, 1.0, 5), CosineAnnealingLR(T_max=20)], milestones=[5]): the
  // cosine's count starts at the milestone.
  LrScheduleConfig s;
  s.warmup_steps = 5;
  s.warmup_start_factor = 0.1;
  s.decay = Decay::kCosine;
  s.t_max = 20;
  EXPECT_DOUBLE_EQ(Lr(2.0, s, 0), 0.2);
  EXPECT_DOUBLE_EQ(Lr(2.0, s, 4), 2.0 * (0.1 + 0.9 * 4 / 5));
  EXPECT_DOUBLE_EQ(Lr(2.0, s, 5), 2.0);
  EXPECT_NEAR(Lr(2.0, s, 15), 1.0, 1e-15);
  EXPECT_NEAR(Lr(2.0, s, 25), 0.0, 1e-15);
}

TEST(LrScheduleTest, WarmupThenStepDecay) {
  LrScheduleConfig s;
  s.warmup_steps = 3;
  s.warmup_start_factor = 0.25;
  s.decay = Decay::kStep;
  s.step_size = 2;
  s.gamma = 0.5;
  const double want[] = {0.25, 0.5, 0.75, 1.0, 1.0, 0.5, 0.5, 0.25, 0.25};
  for (int t = 0; t < 9; ++t) EXPECT_DOUBLE_EQ(Lr(1.0, s, t), want[t]) << "t " << t;
}

TEST(LrScheduleTest, EqualityComparesEveryField) {
  LrScheduleConfig a, b;
  EXPECT_EQ(a, b);
  b.eta_min = 1e-4;
  EXPECT_NE(a, b);
  b = a;
  b.warmup_start_factor = 0.5;
  EXPECT_NE(a, b);
}

void ExpectInvalid(const LrScheduleConfig& s, const std::string& message) {
  const Status st = ValidateLrSchedule(s);
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument) << message;
  EXPECT_NE(st.message().find(message), std::string::npos) << st.message();
}

TEST(LrScheduleTest, Validation) {
  LrScheduleConfig s;
  s.decay = Decay::kCosine;
  s.t_max = 0;
  ExpectInvalid(s, "cosine.t_max must be >= 1, got 0");
  s.t_max = 5;
  s.eta_min = -1e-3;
  ExpectInvalid(s, "cosine.eta_min must be >= 0");
  s.eta_min = std::nan("");
  ExpectInvalid(s, "cosine.eta_min must be >= 0");

  s = LrScheduleConfig();
  s.decay = Decay::kStep;
  s.step_size = 0;
  ExpectInvalid(s, "step.step_size must be >= 1, got 0");
  s.step_size = 3;
  s.gamma = -0.5;
  ExpectInvalid(s, "step.gamma must be >= 0");
  s.gamma = HUGE_VAL;
  ExpectInvalid(s, "step.gamma must be >= 0");
  s.gamma = 0.5;
  s.t_max = 0;  // the cosine's fields do not matter to a step decay
  EXPECT_TRUE(ValidateLrSchedule(s).ok());

  s = LrScheduleConfig();
  s.warmup_steps = -1;
  ExpectInvalid(s, "warmup.steps must be >= 0");
  s.warmup_steps = 10;
  for (double bad : {0.0, -0.5, 1.5, std::nan("")}) {
    s.warmup_start_factor = bad;
    ExpectInvalid(s, "warmup.start_factor must be in (0, 1]");
  }
  s.warmup_start_factor = 1.0;  // a warm-up that starts at the full rate is allowed
  EXPECT_TRUE(ValidateLrSchedule(s).ok());
}

}  // namespace
}  // namespace normd
