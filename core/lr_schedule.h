// Learning-rate schedules: the rate an optimizer step uses as a function of the base rate (the
// optimizer's lr) and of t, the number of steps already taken under the schedule (a torch
// scheduler's last_epoch when scheduler.step() follows every optimizer.step()).
//
// With W = warmup_steps, s = warmup_start_factor and u = t - W:
//   t < W (warm-up):   lr(t) = base * (s + (1 - s) * t / W)
//   otherwise, by decay:
//     none:    base
//     step:    base * gamma^floor(u / step_size)
//     cosine:  eta_min + (base - eta_min) * (1 + cos(pi * u / t_max)) / 2
// The cosine is PyTorch's: past t_max it rises again (period 2 * t_max), it does not hold.
//
// In PyTorch terms, for an optimizer `opt` whose lr is base:
//   warm-up alone:        LinearLR(opt, start_factor=s, end_factor=1.0, total_iters=W)
//   decay alone:          StepLR(opt, step_size, gamma) or CosineAnnealingLR(opt, t_max, eta_min)
//   warm-up then decay:   SequentialLR(opt, [LinearLR(opt, s, 1.0, W), <the decay>],
//                                      milestones=[W])
// so the decay's own count (step_size, t_max) starts when the warm-up ends. PyTorch updates the
// rate recursively (LinearLR, StepLR and CosineAnnealingLR multiply or rescale the previous
// rate); these closed forms equal it in exact arithmetic, and in doubles up to the rounding the
// recursion accumulates: measured against torch 1.13, a relative 1e-15 for StepLR and up to
// about 1e-13 over schedules of thousands of steps (a 5000-step LinearLR 2e-14, a 3000-step
// CosineAnnealingLR with eta_min 1e-4 run for 12000 steps 1.2e-13).
#ifndef NORMD_CORE_LR_SCHEDULE_H_
#define NORMD_CORE_LR_SCHEDULE_H_

#include <cstdint>

#include "core/config.h"
#include "core/status.h"

namespace normd {

// INVALID_ARGUMENT unless: warmup_steps >= 0 and, with a warm-up, 0 < warmup_start_factor <= 1
// (LinearLR divides by it); step_size >= 1 and gamma finite and >= 0; t_max >= 1 and eta_min
// finite and >= 0. Fields of a decay that is not selected are not checked. Messages name the
// field without a prefix ("cosine.t_max must be >= 1, got 0").
Status ValidateLrSchedule(const LrScheduleConfig& schedule);

// The rate of the step taken after t earlier steps under `schedule`.
// REQUIRES: ValidateLrSchedule(schedule) is OK, t >= 0.
double ScheduledLearningRate(double base_lr, const LrScheduleConfig& schedule, int64_t t);

}  // namespace normd

#endif  // NORMD_CORE_LR_SCHEDULE_H_
