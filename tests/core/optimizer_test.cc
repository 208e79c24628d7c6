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

}  // namespace
}  // namespace normd
