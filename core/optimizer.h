// Optimizers with torch.optim's exact update rules (single-tensor, non-foreach form):
//
// SGD:   g = grad + weight_decay * p
//        if momentum != 0: buf = g on the first step, else momentum * buf + (1 - dampening) * g;
//                          g = nesterov ? g + momentum * buf : buf
//        p -= lr * g
// Adam:  t += 1; if decoupled (AdamW): p *= 1 - lr * weight_decay
//                else: g = grad + weight_decay * p
//        m = beta1 * m + (1 - beta1) * g;  v = beta2 * v + (1 - beta2) * g^2
//        p -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
//
// lr above is the step's scheduled rate (core/lr_schedule.h; the configured lr without a
// schedule), and weight_decay is 0 for the parameters exempted by
// OptimizerConfig::no_weight_decay_on_norm_and_bias — PyTorch's two parameter groups
// [{params: others, weight_decay: wd}, {params: norm and bias parameters, weight_decay: 0}].
//
// The optimizer owns its state, kept per parameter index (never by pointer): for SGD the
// momentum buffer, for Adam exp_avg, exp_avg_sq and step; and, with a schedule, the number of
// steps taken under it (the torch scheduler's last_epoch). Hyperparameters can change between
// steps (UpdateConfig) without losing that state, as a PyTorch scheduler does.
// Gradient clipping (OptimizerConfig::max_grad_norm) is the caller's (core/clip_grad.h), as
// clip_grad_norm_ is separate from torch.optim.
// Not thread-safe; the owning Model serialises access.
#ifndef NORMD_CORE_OPTIMIZER_H_
#define NORMD_CORE_OPTIMIZER_H_

#include <string>
#include <vector>

#include "core/config.h"
#include "core/layer.h"
#include "core/status.h"

namespace normd {

class Optimizer {
 public:
  // Checks hyperparameters with torch.optim's rules (lr >= 0, momentum >= 0,
  // weight_decay >= 0, 0 <= beta < 1, eps >= 0, nesterov needs momentum > 0 and dampening 0),
  // the schedule (ValidateLrSchedule) and max_grad_norm >= 0.
  static Status Validate(const OptimizerConfig& config);

  // REQUIRES: Validate(config) is OK. `params` gives the shapes the state is sized for.
  // norm_or_bias[i]: parameter i belongs to a norm layer or is a bias (what
  // no_weight_decay_on_norm_and_bias exempts); empty: none is.
  Optimizer(const OptimizerConfig& config, const std::vector<Parameter*>& params,
            std::vector<bool> norm_or_bias = {});

  // One update of every parameter from its grad, at learning_rate(); then, with a schedule,
  // the schedule advances one step. Returns the rate used. REQUIRES: the same parameters, in
  // the same order, as at construction.
  double Step(const std::vector<Parameter*>& params);
  // The same, skipping parameter i when !trainable[i]: no update, no weight decay, its state
  // (momentum buffer, Adam moments and step) untouched — torch.optim skipping a parameter
  // whose grad is None. REQUIRES: trainable.size() == params.size().
  double Step(const std::vector<Parameter*>& params, const std::vector<bool>& trainable);

  // The rate the next Step uses: the configured lr, scheduled.
  double learning_rate() const;
  // Steps taken under the current schedule (0 without one).
  int64_t schedule_step() const { return schedule_step_; }

  // Replaces the hyperparameters, keeping the state. The kind cannot change. A schedule that
  // differs from the current one starts from step 0, as a newly constructed torch scheduler;
  // an unchanged one keeps its progress.
  Status UpdateConfig(const OptimizerConfig& config);
  const OptimizerConfig& config() const { return config_; }

  // The schedule's progress as a named counter, "lr_scheduler.last_epoch" (the key of a torch
  // scheduler's state_dict); none without a schedule.
  std::vector<StateSlot> schedule_state();

  // Named state for parameter i, names relative to the parameter: SGD "step" and, with
  // momentum, "momentum_buffer"; Adam "step", "exp_avg", "exp_avg_sq". Every slot exists from
  // construction (zeros, step 0) so state can be written before the first step; with step 0
  // the SGD buffer is treated as not yet existing, as in torch.optim.
  std::vector<StateSlot> state(size_t i);

 private:
  struct ParamState {
    Tensor a;  // SGD: momentum_buffer; Adam: exp_avg
    Tensor b;  // Adam: exp_avg_sq
    int64_t step = 0;
  };
  OptimizerConfig config_;
  std::vector<ParamState> state_;
  std::vector<bool> norm_or_bias_;  // per parameter; see the constructor
  int64_t schedule_step_ = 0;
};

}  // namespace normd

#endif  // NORMD_CORE_OPTIMIZER_H_
