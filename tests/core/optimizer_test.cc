// core/optimizer: torch.optim's update rules on hand-computed steps.
#include "core/optimizer.h"

#include <gtest/gtest.h>

#include <cmath>

namespace normd {
namespace {

Parameter Param(float value, float grad) {
  Parameter p{"w", Tensor(Shape{1}, value), Tensor(Shape{1}, grad)};
  return p;
}

TEST(OptimizerTest, SgdMomentumDampeningWeightDecay) {
  OptimizerConfig c;
  c.sgd = {0.1f, 0.9f, 0.5f, false, 0.01f};
  Parameter p = Param(1.0f, 2.0f);
  std::vector<Parameter*> ps = {&p};
  Optimizer opt(c, ps);
  opt.Step(ps);  // g = 2 + 0.01 = 2.01; buf = g; p = 1 - 0.1*2.01
  EXPECT_NEAR(p.value.data()[0], 1.0 - 0.201, 1e-6);
  const double p1 = 1.0 - 0.201;
  opt.Step(ps);  // g = 2 + 0.01*p1; buf = 0.9*2.01 + 0.5*g
  const double g2 = 2.0 + 0.01 * p1;
  const double buf2 = 0.9 * 2.01 + 0.5 * g2;
  EXPECT_NEAR(p.value.data()[0], p1 - 0.1 * buf2, 1e-6);
}

TEST(OptimizerTest, SgdNesterov) {
  OptimizerConfig c;
  c.sgd = {0.1f, 0.9f, 0.0f, true, 0.0f};
  Parameter p = Param(0.0f, 1.0f);
  std::vector<Parameter*> ps = {&p};
  Optimizer opt(c, ps);
  opt.Step(ps);  // buf = 1; d = 1 + 0.9 = 1.9
  EXPECT_NEAR(p.value.data()[0], -0.19, 1e-7);
  opt.Step(ps);  // buf = 0.9 + 1 = 1.9; d = 1 + 1.71 = 2.71
  EXPECT_NEAR(p.value.data()[0], -0.19 - 0.271, 1e-6);
}

TEST(OptimizerTest, AdamFirstStepMovesByLearningRate) {
  OptimizerConfig c;
  c.kind = OptimizerKind::kAdam;
  c.adam.lr = 0.01f;
  Parameter p = Param(0.5f, -3.0f);
  std::vector<Parameter*> ps = {&p};
  Optimizer opt(c, ps);
  opt.Step(ps);  // m_hat = g, v_hat = g^2: p += lr * |g| / (|g| + eps)
  EXPECT_NEAR(p.value.data()[0], 0.5 + 0.01 * 3.0 / (3.0 + 1e-8), 1e-7);
  // Second step with the same gradient, from the definition.
  opt.Step(ps);
  const double b1 = 0.9, b2 = 0.999, g = -3.0;
  const double m = b1 * (1 - b1) * g + (1 - b1) * g;
  const double v = b2 * (1 - b2) * g * g + (1 - b2) * g * g;
  const double step = 0.01 / (1 - b1 * b1) * m / (std::sqrt(v) / std::sqrt(1 - b2 * b2) + 1e-8);
  EXPECT_NEAR(p.value.data()[0], 0.5 + 0.01 * 3.0 / (3.0 + 1e-8) - step, 1e-6);
}

TEST(OptimizerTest, AdamWDecaysTheWeightNotTheGradient) {
  OptimizerConfig c;
  c.kind = OptimizerKind::kAdam;
  c.adam.lr = 0.1f;
  c.adam.weight_decay = 0.5f;
  c.adam.decoupled_weight_decay = true;
  Parameter p = Param(2.0f, 1.0f);
  std::vector<Parameter*> ps = {&p};
  Optimizer opt(c, ps);
  opt.Step(ps);  // p = 2 * (1 - 0.05) - 0.1 * 1/(1 + eps)
  EXPECT_NEAR(p.value.data()[0], 2.0 * 0.95 - 0.1, 1e-6);

  // Adam (coupled): the decay joins the gradient, g = -0.5 + 0.5*2 = 0.5, so the first step,
  // lr*sign(g), goes down where it would go up without decay (2.1) or with AdamW's (2.0).
  c.adam.decoupled_weight_decay = false;
  Parameter q = Param(2.0f, -0.5f);
  std::vector<Parameter*> qs = {&q};
  Optimizer adam(c, qs);
  adam.Step(qs);
  const double q1 = 2.0 - 0.1 * 0.5 / (0.5 + 1e-8);
  EXPECT_NEAR(q.value.data()[0], q1, 1e-6);
  // The second step, from the definition: g2 = -0.5 + 0.5*q1 (the decay of the new weight).
  adam.Step(qs);
  const double b1 = 0.9, b2 = 0.999, g1 = 0.5, g2 = -0.5 + 0.5 * q1;
  const double m = b1 * (1 - b1) * g1 + (1 - b1) * g2;
  const double v = b2 * (1 - b2) * g1 * g1 + (1 - b2) * g2 * g2;
  const double step = 0.1 / (1 - b1 * b1) * m / (std::sqrt(v) / std::sqrt(1 - b2 * b2) + 1e-8);
  EXPECT_NEAR(q.value.data()[0], q1 - step, 1e-6);
}

TEST(OptimizerTest, ValidateFollowsTorchRules) {
  OptimizerConfig c;
  c.sgd.lr = -1.0f;
  EXPECT_FALSE(Optimizer::Validate(c).ok());
  c.sgd = {0.1f, 0.0f, 0.0f, true, 0.0f};
  EXPECT_FALSE(Optimizer::Validate(c).ok());  // nesterov without momentum
  c.kind = OptimizerKind::kAdam;
  c.adam.beta1 = 1.0f;
  EXPECT_FALSE(Optimizer::Validate(c).ok());
  c.adam.beta1 = 0.9f;
  EXPECT_TRUE(Optimizer::Validate(c).ok());
}

TEST(OptimizerTest, StateSlotsAreNamedLikeTorch) {
  OptimizerConfig c;
  c.kind = OptimizerKind::kAdam;
  Parameter p = Param(0.0f, 1.0f);
  std::vector<Parameter*> ps = {&p};
  Optimizer opt(c, ps);
  opt.Step(ps);
  std::vector<std::string> names;
  for (const StateSlot& s : opt.state(0)) names.push_back(s.name);
  EXPECT_EQ(names, (std::vector<std::string>{"exp_avg", "exp_avg_sq", "step"}));
  EXPECT_EQ(*opt.state(0).back().counter, 1);
}

TEST(OptimizerTest, ValidateChecksScheduleAndClipping) {
  OptimizerConfig c;
  c.schedule.decay = LrScheduleConfig::Decay::kCosine;
  c.schedule.t_max = 0;
  Status s = Optimizer::Validate(c);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("lr_schedule: cosine.t_max must be >= 1"), std::string::npos)
      << s.message();
  c.schedule.t_max = 10;
  c.max_grad_norm = -1.0;
  s = Optimizer::Validate(c);
  EXPECT_NE(s.message().find("max_grad_norm must be >= 0"), std::string::npos) << s.message();
  c.max_grad_norm = 0.0;  // no clipping
  EXPECT_TRUE(Optimizer::Validate(c).ok());
}

// A step-decayed SGD: each Step uses learning_rate() and then advances the schedule.
TEST(OptimizerTest, StepUsesTheScheduledRateAndAdvancesTheSchedule) {
  OptimizerConfig c;
  c.sgd.lr = 1.0f;
  c.schedule.warmup_steps = 2;
  c.schedule.warmup_start_factor = 0.5;
  c.schedule.decay = LrScheduleConfig::Decay::kStep;
  c.schedule.step_size = 1;
  c.schedule.gamma = 0.5;
  Parameter p = Param(0.0f, 1.0f);
  std::vector<Parameter*> ps = {&p};
  Optimizer opt(c, ps);
  const double want[] = {0.5, 0.75, 1.0, 0.5, 0.25};
  double moved = 0.0;
  for (int t = 0; t < 5; ++t) {
    EXPECT_EQ(opt.schedule_step(), t);
    EXPECT_DOUBLE_EQ(opt.learning_rate(), want[t]);
    EXPECT_DOUBLE_EQ(opt.Step(ps), want[t]);
    moved += want[t];
    EXPECT_FLOAT_EQ(p.value.data()[0], static_cast<float>(-moved));  // p -= lr * 1
  }
  std::vector<StateSlot> slots = opt.schedule_state();
  ASSERT_EQ(slots.size(), 1u);
  EXPECT_EQ(slots[0].name, "lr_scheduler.last_epoch");
  EXPECT_EQ(*slots[0].counter, 5);
}

TEST(OptimizerTest, WithoutScheduleThereIsNoScheduleState) {
  OptimizerConfig c;
  c.sgd.lr = 0.25f;
  Parameter p = Param(0.0f, 1.0f);
  std::vector<Parameter*> ps = {&p};
  Optimizer opt(c, ps);
  EXPECT_EQ(opt.Step(ps), 0.25);
  EXPECT_EQ(opt.schedule_step(), 0);
  EXPECT_TRUE(opt.schedule_state().empty());
}

TEST(OptimizerTest, UpdateConfigRestartsAChangedScheduleAndKeepsAnUnchangedOne) {
  OptimizerConfig c;
  c.sgd.lr = 1.0f;
  c.schedule.decay = LrScheduleConfig::Decay::kCosine;
  c.schedule.t_max = 4;
  Parameter p = Param(0.0f, 1.0f);
  std::vector<Parameter*> ps = {&p};
  Optimizer opt(c, ps);
  opt.Step(ps);
  opt.Step(ps);
  EXPECT_EQ(opt.schedule_step(), 2);
  EXPECT_DOUBLE_EQ(opt.learning_rate(), 0.5);

  // Same schedule, new base rate (as set_lr does): progress kept, the factor applies to it.
  c.sgd.lr = 2.0f;
  ASSERT_TRUE(opt.UpdateConfig(c).ok());
  EXPECT_EQ(opt.schedule_step(), 2);
  EXPECT_DOUBLE_EQ(opt.learning_rate(), 1.0);

  // A different schedule is a new torch scheduler: it starts at 0.
  c.schedule.t_max = 8;
  ASSERT_TRUE(opt.UpdateConfig(c).ok());
  EXPECT_EQ(opt.schedule_step(), 0);
  EXPECT_DOUBLE_EQ(opt.learning_rate(), 2.0);

  // A refused update changes nothing.
  opt.Step(ps);
  OptimizerConfig bad = c;
  bad.schedule.t_max = 0;
  EXPECT_FALSE(opt.UpdateConfig(bad).ok());
  EXPECT_EQ(opt.schedule_step(), 1);
  EXPECT_EQ(opt.config().schedule.t_max, 8);
}

// Two parameter groups as recipes build them: norm-layer parameters and biases get no decay.
TEST(OptimizerTest, NoWeightDecayOnNormAndBiasExemptsTheMarkedParameters) {
  for (const bool adamw : {false, true}) {
    OptimizerConfig c;
    if (adamw) {
      c.kind = OptimizerKind::kAdam;
      c.adam = {0.1f, 0.9f, 0.999f, 1e-8f, 0.5f, true};
    } else {
      c.sgd = {0.1f, 0.0f, 0.0f, false, 0.5f};
    }
    c.no_weight_decay_on_norm_and_bias = true;
    Parameter weight = Param(2.0f, 0.0f), bias = Param(2.0f, 0.0f);
    std::vector<Parameter*> ps = {&weight, &bias};
    Optimizer opt(c, ps, {false, true});
    opt.Step(ps);
    // SGD: p -= lr * wd * p = 2 - 0.1; AdamW: p *= 1 - lr * wd (the zero gradient adds nothing).
    EXPECT_FLOAT_EQ(weight.value.data()[0], adamw ? 2.0f * 0.95f : 1.9f) << adamw;
    EXPECT_EQ(bias.value.data()[0], 2.0f) << adamw;

    // The flag off: one group, every parameter decays.
    c.no_weight_decay_on_norm_and_bias = false;
    ASSERT_TRUE(opt.UpdateConfig(c).ok());
    opt.Step(ps);
    EXPECT_LT(bias.value.data()[0], 2.0f) << adamw;
  }
}

TEST(OptimizerTest, CoupledAdamWeightDecayIsExemptToo) {
  OptimizerConfig c;
  c.kind = OptimizerKind::kAdam;
  c.adam.lr = 0.1f;
  c.adam.weight_decay = 1.0f;
  c.no_weight_decay_on_norm_and_bias = true;
  // Zero gradient: only the L2 term (wd * p) could move the parameter.
  Parameter gamma = Param(1.0f, 0.0f), w = Param(1.0f, 0.0f);
  std::vector<Parameter*> ps = {&gamma, &w};
  Optimizer opt(c, ps, {true, false});
  opt.Step(ps);
  EXPECT_EQ(gamma.value.data()[0], 1.0f);
  EXPECT_NEAR(w.value.data()[0], 0.9f, 1e-6);  // Adam's first step: lr * sign(wd * p)
}

}  // namespace
}  // namespace normd
