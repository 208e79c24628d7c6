#include "core/optimizer.h"

#include <cmath>
#include <utility>

#include "core/lr_schedule.h"

namespace normd {
namespace {

bool FiniteNonNegative(float v) { return std::isfinite(v) && v >= 0.0f; }

// One SGD update of n elements. The hyperparameters are copied to locals and each case gets
// its own loop, so the compiler neither reloads them per element (a float store could alias
// the config) nor branches inside the loop: every loop vectorises. Per element the operations
// and their order are those of the reference rule in optimizer.h.
// lr and wd are the step's: scheduled, and 0 for a parameter exempt from weight decay.
void SgdUpdate(const SgdConfig& c, float lr, float wd, bool first, int64_t n, const float* g,
               float* w, float* buf) {
  const float mom = c.momentum, damp = 1.0f - c.dampening;
  const bool decay = wd != 0.0f;
  if (mom == 0.0f) {
    if (decay) {
      for (int64_t j = 0; j < n; ++j) w[j] = w[j] - lr * (g[j] + wd * w[j]);
    } else {
      for (int64_t j = 0; j < n; ++j) w[j] = w[j] - lr * g[j];
    }
    return;
  }
  if (first) {
    for (int64_t j = 0; j < n; ++j) {
      const float d = decay ? g[j] + wd * w[j] : g[j];
      buf[j] = d;
      w[j] = w[j] - lr * (c.nesterov ? d + mom * d : d);
    }
    return;
  }
  if (!decay && !c.nesterov) {
    for (int64_t j = 0; j < n; ++j) {
      const float b = buf[j] * mom + damp * g[j];
      buf[j] = b;
      w[j] = w[j] - lr * b;
    }
    return;
  }
  const bool nesterov = c.nesterov;
  for (int64_t j = 0; j < n; ++j) {
    const float d = decay ? g[j] + wd * w[j] : g[j];
    const float b = buf[j] * mom + damp * d;
    buf[j] = b;
    w[j] = w[j] - lr * (nesterov ? d + mom * b : b);
  }
}

}  // namespace

Status Optimizer::Validate(const OptimizerConfig& config) {
  Status s = ValidateLrSchedule(config.schedule);
  if (!s.ok()) return s.WithPrefix("lr_schedule");
  if (!(std::isfinite(config.max_grad_norm) && config.max_grad_norm >= 0.0)) {
    return InvalidArgument("max_grad_norm must be >= 0 (0: no clipping), got ",
                           config.max_grad_norm);
  }
  if (config.kind == OptimizerKind::kSgd) {
    const SgdConfig& c = config.sgd;
    if (!FiniteNonNegative(c.lr)) return InvalidArgument("sgd.lr must be >= 0, got ", c.lr);
    if (!FiniteNonNegative(c.momentum)) {
      return InvalidArgument("sgd.momentum must be >= 0, got ", c.momentum);
    }
    if (!std::isfinite(c.dampening)) {
      return InvalidArgument("sgd.dampening must be finite, got ", c.dampening);
    }
    if (!FiniteNonNegative(c.weight_decay)) {
      return InvalidArgument("sgd.weight_decay must be >= 0, got ", c.weight_decay);
    }
    if (c.nesterov && (c.momentum <= 0.0f || c.dampening != 0.0f)) {
      return InvalidArgument("sgd.nesterov requires momentum > 0 and dampening 0, got momentum ",
                             c.momentum, " and dampening ", c.dampening);
    }
    return Status::Ok();
  }
  const AdamConfig& c = config.adam;
  if (!FiniteNonNegative(c.lr)) return InvalidArgument("adam.lr must be >= 0, got ", c.lr);
  if (!(c.beta1 >= 0.0f && c.beta1 < 1.0f)) {
    return InvalidArgument("adam.beta1 must be in [0, 1), got ", c.beta1);
  }
  if (!(c.beta2 >= 0.0f && c.beta2 < 1.0f)) {
    return InvalidArgument("adam.beta2 must be in [0, 1), got ", c.beta2);
  }
  if (!FiniteNonNegative(c.eps)) return InvalidArgument("adam.eps must be >= 0, got ", c.eps);
  if (!FiniteNonNegative(c.weight_decay)) {
    return InvalidArgument("adam.weight_decay must be >= 0, got ", c.weight_decay);
  }
  return Status::Ok();
}

Optimizer::Optimizer(const OptimizerConfig& config, const std::vector<Parameter*>& params,
                     std::vector<bool> norm_or_bias)
    : config_(config), state_(params.size()), norm_or_bias_(std::move(norm_or_bias)) {
  norm_or_bias_.resize(params.size(), false);
  for (size_t i = 0; i < params.size(); ++i) {
    const Shape& s = params[i]->value.shape();
    if (config_.kind == OptimizerKind::kSgd) {
      if (config_.sgd.momentum != 0.0f) state_[i].a = Tensor(s, 0.0f);
    } else {
      state_[i].a = Tensor(s, 0.0f);
      state_[i].b = Tensor(s, 0.0f);
    }
  }
}

double Optimizer::learning_rate() const {
  const double base = config_.kind == OptimizerKind::kSgd ? config_.sgd.lr : config_.adam.lr;
  if (!config_.schedule.active()) return base;
  return ScheduledLearningRate(base, config_.schedule, schedule_step_);
}

double Optimizer::Step(const std::vector<Parameter*>& params) {
  return Step(params, std::vector<bool>(params.size(), true));
}

double Optimizer::Step(const std::vector<Parameter*>& params, const std::vector<bool>& trainable) {
  // torch.optim hands lr to its kernels as a Python float (double): Adam divides it by the
  // bias correction in double, and every tensor operation rounds its scalar to float32.
  const double lr = learning_rate();
  const bool exempt_some = config_.no_weight_decay_on_norm_and_bias;
  for (size_t i = 0; i < params.size(); ++i) {
    if (!trainable[i]) continue;
    Parameter& p = *params[i];
    ParamState& st = state_[i];
    const int64_t n = p.value.size();
    float* w = p.value.data();
    const float* g = p.grad.data();
    const bool decay = !(exempt_some && norm_or_bias_[i]);
    if (config_.kind == OptimizerKind::kSgd) {
      const SgdConfig& c = config_.sgd;
      float* buf = st.a.size() == n ? st.a.data() : nullptr;
      if (c.momentum != 0.0f && buf == nullptr) {
        // Momentum switched on by UpdateConfig: the buffer starts now, as torch's would.
        st.a = Tensor(p.value.shape(), 0.0f);
        st.step = 0;
        buf = st.a.data();
      }
      SgdUpdate(c, static_cast<float>(lr), decay ? c.weight_decay : 0.0f, st.step == 0, n, g, w,
                buf);
      ++st.step;
      continue;
    }
    const AdamConfig& c = config_.adam;
    ++st.step;
    const double t = static_cast<double>(st.step);
    const double bc1 = 1.0 - std::pow(static_cast<double>(c.beta1), t);
    const double bc2 = 1.0 - std::pow(static_cast<double>(c.beta2), t);
    const float step_size = static_cast<float>(lr / bc1);
    const float bc2_sqrt = static_cast<float>(std::sqrt(bc2));
    // Locals, not config reads, inside the loop: see SgdUpdate.
    const float wd = decay ? c.weight_decay : 0.0f;
    // AdamW multiplies by 1 - lr * weight_decay (computed in double, as torch's Python floats),
    // which is 1 for an exempt parameter: skipping it is the same.
    const bool decoupled = c.decoupled_weight_decay && wd != 0.0f;
    const float shrink = static_cast<float>(1.0 - lr * static_cast<double>(wd));
    const float beta1 = c.beta1, beta2 = c.beta2, eps = c.eps;
    const float one_m_beta1 = 1.0f - beta1, one_m_beta2 = 1.0f - beta2;
    const bool coupled = !c.decoupled_weight_decay && wd != 0.0f;
    float* m = st.a.data();
    float* v = st.b.data();
    for (int64_t j = 0; j < n; ++j) {
      float d = g[j];
      if (decoupled) {
        w[j] *= shrink;
      } else if (coupled) {
        d = d + wd * w[j];
      }
      m[j] = m[j] * beta1 + one_m_beta1 * d;
      v[j] = v[j] * beta2 + one_m_beta2 * d * d;
      const float denom = std::sqrt(v[j]) / bc2_sqrt + eps;
      w[j] = w[j] - step_size * (m[j] / denom);
    }
  }
  if (config_.schedule.active()) ++schedule_step_;
  return lr;
}

Status Optimizer::UpdateConfig(const OptimizerConfig& config) {
  if (config.kind != config_.kind) {
    return InvalidArgument("optimizer kind cannot change (the model uses ",
                           config_.kind == OptimizerKind::kSgd ? "sgd" : "adam", ")");
  }
  NORMD_RETURN_IF_ERROR(Validate(config));
  if (config.schedule != config_.schedule) schedule_step_ = 0;
  config_ = config;
  return Status::Ok();
}

std::vector<StateSlot> Optimizer::schedule_state() {
  if (!config_.schedule.active()) return {};
  return {StateSlot{"lr_scheduler.last_epoch", nullptr, &schedule_step_}};
}

std::vector<StateSlot> Optimizer::state(size_t i) {
  ParamState& st = state_[i];
  std::vector<StateSlot> slots;
  if (config_.kind == OptimizerKind::kSgd) {
    if (st.a.size() > 0) slots.push_back(StateSlot{"momentum_buffer", &st.a, nullptr});
  } else {
    slots.push_back(StateSlot{"exp_avg", &st.a, nullptr});
    slots.push_back(StateSlot{"exp_avg_sq", &st.b, nullptr});
  }
  slots.push_back(StateSlot{"step", nullptr, &st.step});
  return slots;
}

}  // namespace normd
