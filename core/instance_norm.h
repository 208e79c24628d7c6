// Instance Normalization, exactly as PyTorch's nn.InstanceNorm1d / nn.InstanceNorm2d.
//
// Input: InstanceNorm1d takes (N, C, L) batches (per-sample (C, L)); InstanceNorm2d takes
// (N, C, H, W). Each (sample, channel) instance of S = L or H*W values is normalised by its own
// mean and biased variance: GroupNorm with one channel per group (core/group_norm.h), weight
// and bias per channel with affine (default off, as PyTorch).
//
// Running statistics (track_running_stats, default off, as PyTorch):
//  - Instance statistics normalise in training, and in eval without tracking; otherwise the
//    running statistics do (then dx = dy * weight / sqrt(running_var + eps)).
//  - A training forward with tracking updates, per channel,
//      running = (1 - momentum) * running + momentum * mean over the batch of the instances'
//    statistics, the variance taking each instance's unbiased variance (S / (S - 1)); this is
//    what ATen's instance_norm does (batch_norm over (1, N*C, S), then the mean over N).
//    num_batches_tracked is in the state_dict but, as in PyTorch, never incremented.
//  - Normalising with instance statistics when S == 1 is PyTorch's error ("Expected more than
//    1 spatial element when training").
//  - The update is two-phase like BatchNorm's: Forward leaves it pending in the LayerCache
//    (with ctx.update_running_stats) and ApplyPendingUpdate commits it.
//  - A frozen layer (Layer::frozen, with tracking) uses eval semantics in train mode.
//
// Gradient contract: as GroupNorm with instance statistics; with running statistics Forward
// caches the per-channel 1/sqrt(running_var + eps). Parameter gradients are accumulated, dx is
// overwritten.
#ifndef NORMD_CORE_INSTANCE_NORM_H_
#define NORMD_CORE_INSTANCE_NORM_H_

#include "core/group_norm.h"
#include "core/layer.h"

namespace normd {

class InstanceNorm : public Layer {
 public:
  // two_d selects InstanceNorm2d (N, C, H, W) over InstanceNorm1d (N, C, L).
  InstanceNorm(const InstanceNormConfig& config, bool two_d) : config_(config), two_d_(two_d) {}

  const char* kind_name() const override { return two_d_ ? "InstanceNorm2d" : "InstanceNorm1d"; }
  Status Build(const Shape& sample_in, Shape* sample_out) override;
  int64_t NumParameters() const override;
  void Allocate(Rng& rng) override;
  Status CheckBatch(const Shape& batch_in, const ForwardContext& ctx) const override;
  void Forward(const ConstTensorView& x, Tensor* y, LayerCache* cache,
               const ForwardContext& ctx) const override;
  void Backward(const ConstTensorView& x, const Tensor& y, const ConstTensorView& dy,
                const LayerCache& cache, const ForwardContext& ctx, Tensor* dx) override;
  std::vector<Parameter*> parameters() override;
  std::vector<StateSlot> state() override;
  bool HasRunningStats() const override { return config_.track_running_stats; }
  void ApplyPendingUpdate(LayerCache* cache) override;
  void ResetRunningStats() override;

  const InstanceNormConfig& config() const { return config_; }
  const Tensor& running_mean() const { return running_mean_; }
  const Tensor& running_var() const { return running_var_; }

 private:
  bool UsesInstanceStats(const ForwardContext& ctx) const {
    return (ctx.training && !frozen()) || !config_.track_running_stats;
  }
  GroupLayout Layout(int64_t n) const;

  InstanceNormConfig config_;
  bool two_d_;
  int64_t spatial_ = 1;
  Parameter weight_;     // (C); only with affine
  Parameter bias_;       // (C); only with affine
  Tensor running_mean_;  // (C); only with tracking
  Tensor running_var_;   // (C); only with tracking
  int64_t num_batches_tracked_ = 0;  // PyTorch keeps it at 0 for InstanceNorm
};

}  // namespace normd

#endif  // NORMD_CORE_INSTANCE_NORM_H_
