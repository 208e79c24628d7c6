#include "core/lr_schedule.h"

#include <cmath>

namespace normd {

Status ValidateLrSchedule(const LrScheduleConfig& s) {
  if (s.warmup_steps < 0) {
    return InvalidArgument("warmup.steps must be >= 0, got ", s.warmup_steps);
  }
  if (s.warmup_steps > 0 &&
      !(std::isfinite(s.warmup_start_factor) && s.warmup_start_factor > 0.0 &&
        s.warmup_start_factor <= 1.0)) {
    return InvalidArgument("warmup.start_factor must be in (0, 1], got ", s.warmup_start_factor);
  }
  switch (s.decay) {
    case LrScheduleConfig::Decay::kNone:
      break;
    case LrScheduleConfig::Decay::kStep:
      if (s.step_size < 1) return InvalidArgument("step.step_size must be >= 1, got ", s.step_size);
      if (!(std::isfinite(s.gamma) && s.gamma >= 0.0)) {
        return InvalidArgument("step.gamma must be >= 0, got ", s.gamma);
      }
      break;
    case LrScheduleConfig::Decay::kCosine:
      if (s.t_max < 1) return InvalidArgument("cosine.t_max must be >= 1, got ", s.t_max);
      if (!(std::isfinite(s.eta_min) && s.eta_min >= 0.0)) {
        return InvalidArgument("cosine.eta_min must be >= 0, got ", s.eta_min);
      }
      break;
  }
  return Status::Ok();
}

double ScheduledLearningRate(double base_lr, const LrScheduleConfig& s, int64_t t) {
  // Each expression keeps the operation order of PyTorch's closed forms
  // (_get_closed_form_lr), so the only difference from torch is its recursive updating.
  if (t < s.warmup_steps) {
    const double start = s.warmup_start_factor;
    return base_lr * (start + (1.0 - start) * static_cast<double>(t) /
                                  static_cast<double>(s.warmup_steps));
  }
  const int64_t u = t - s.warmup_steps;
  switch (s.decay) {
    case LrScheduleConfig::Decay::kNone:
      return base_lr;
    case LrScheduleConfig::Decay::kStep:
      return base_lr * std::pow(s.gamma, static_cast<double>(u / s.step_size));
    case LrScheduleConfig::Decay::kCosine:
      return s.eta_min + (base_lr - s.eta_min) *
                             (1.0 + std::cos(M_PI * static_cast<double>(u) /
                                             static_cast<double>(s.t_max))) /
                             2.0;
  }
  return base_lr;
}

}  // namespace normd
