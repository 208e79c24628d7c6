// Batch Normalization, exactly as PyTorch's nn.BatchNorm1d / nn.BatchNorm2d.
//
// Input layouts (row-major, see core/tensor.h): BatchNorm1d takes (N, C) or (N, C, L);
// BatchNorm2d takes (N, C, H, W). Internally every case is (N, C, S) with S the product of the
// spatial dimensions (1 for (N, C)); a channel's values are the N*S elements x[n, c, :].
//
// Semantics (torch/nn/modules/batchnorm.py, aten/src/ATen/native/Normalization.cpp):
//  - Batch statistics are used in training, and in eval when track_running_stats is false.
//    They normalise with the biased variance: y = (x - mean) / sqrt(var + eps) * gamma + beta.
//  - Otherwise (eval with tracking) the running statistics normalise; then the input gradient
//    is dy * gamma / sqrt(running_var + eps).
//  - Training with tracking updates running_mean and running_var as
//    (1 - m) * running + m * batch, running_var taking the unbiased batch variance
//    (var * n / (n - 1)), and increments num_batches_tracked; m is the momentum, or
//    1 / num_batches_tracked (after the increment) when cumulative_average (momentum=None).
//  - Normalising with batch statistics when N * S == 1 (one value per channel) is an error,
//    PyTorch's rule: in training, and in eval when track_running_stats is false.
//  - affine=false: no weight/bias. track_running_stats=false: no buffers at all.
//  - A frozen layer (Layer::frozen, with tracking) behaves in train mode exactly as in eval
//    mode: running statistics normalise, nothing is updated, and the backward treats them as
//    constants (PyTorch: this module in eval mode inside a train-mode model).
//
// The update of the running statistics is two-phase: Forward leaves it pending in the
// LayerCache and Commit applies it, so a training step that fails after the forward pass
// (non-finite gradients) leaves the buffers untouched.
//
// Cost: the statistics take one pass over x with double accumulators; the normalisation
// folds to one multiply and one add per element (per-channel scale and shift); the training
// backward takes two passes. A ReLU that follows is fused into both (ForwardWithRelu). Drift figures reuse the statistics (eval mode pays one extra pass to get
// batch statistics, two reads of x in all).
#ifndef NORMD_CORE_BATCH_NORM_H_
#define NORMD_CORE_BATCH_NORM_H_

#include <vector>

#include "core/layer.h"

namespace normd {

// Per-channel moments of a batch: value count, mean, and M2 (sum of squared deviations from
// the mean). This is the separable statistics step: moments computed on shards of a batch
// combine exactly (CombineMoments), so a data-parallel mode can all-reduce them before the
// normalisation (SyncBatchNorm) and get the same result as one big batch.
struct ChannelMoments {
  int64_t count = 0;  // values per channel (N * S)
  std::vector<double> mean;
  std::vector<double> m2;

  double BiasedVar(int64_t c) const { return count > 0 ? m2[c] / count : 0.0; }
  double UnbiasedVar(int64_t c) const { return count > 1 ? m2[c] / (count - 1) : 0.0; }
};

// Computes the local moments of x viewed as (n, channels, s). Two passes: mean, then M2.
void ComputeMoments(const float* x, int64_t n, int64_t channels, int64_t s,
                    ChannelMoments* out);

// Merges b into a (Chan et al.'s parallel update). Both must have the same channel count.
void CombineMoments(ChannelMoments* a, const ChannelMoments& b);

// How far a batch's statistics sit from the running estimates (what normd exports as drift).
// Both are means over channels:
//   mean_shift    = |batch_mean - running_mean| / sqrt(running_var + eps)
//   var_log_ratio = |ln((batch_var + eps) / (running_var + eps))|   (batch_var biased)
// computed before the running update, in train and eval forwards alike.
struct BatchNormDrift {
  bool valid = false;  // false without running statistics (track_running_stats=false)
  double mean_shift = 0.0;
  double var_log_ratio = 0.0;
};

// The size of the last running-statistics update: L2 norms of (new - old).
struct BatchNormUpdate {
  double running_mean_update_norm = 0.0;
  double running_var_update_norm = 0.0;
};

class BatchNorm : public Layer {
 public:
  // two_d selects BatchNorm2d (N, C, H, W) over BatchNorm1d ((N, C) or (N, C, L)).
  BatchNorm(const BatchNormConfig& config, bool two_d);

  const char* kind_name() const override { return two_d_ ? "BatchNorm2d" : "BatchNorm1d"; }
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
  BatchNorm* AsBatchNorm() override { return this; }

  // Fused with a following ReLU (Layer::FusesRelu): two fewer passes over memory forward and
  // one tensor less kept for the backward. The backward recomputes ReLU's mask from x and the
  // forward's per-channel scale and shift in `cache` (the same float operations, so the same
  // mask) instead of reading y, and saves a pass there too.
  bool FusesRelu() const override { return true; }
  void ForwardWithRelu(const ConstTensorView& x, Tensor* y, LayerCache* cache,
                       const ForwardContext& ctx) const override;
  void BackwardWithRelu(const ConstTensorView& x, const Tensor& y, const ConstTensorView& dy,
                        const LayerCache& cache, const ForwardContext& ctx,
                        Tensor* dx) override;
  void RecomputeOutput(const ConstTensorView& x, const LayerCache& cache,
                       Tensor* y) const override;
  bool HasRunningStats() const override { return config_.track_running_stats; }

  // Applies the running-statistics update left pending in `cache` by a Forward with
  // ctx.update_running_stats and clears it; does nothing when none is pending. Returns the
  // update norms.
  BatchNormUpdate Commit(LayerCache* cache);

  // The drift figures a Forward recorded in `cache`.
  static BatchNormDrift DriftOf(const LayerCache& cache);

  // True when a forward with ctx normalises with batch statistics (training and not frozen,
  // or without running statistics).
  bool UsesBatchStatistics(const ForwardContext& ctx) const { return UsesBatchStats(ctx); }
  // The values each channel's statistics take from a batch of `rows` samples (N * S).
  int64_t ValuesPerChannel(int64_t rows) const { return rows * spatial_; }

  // The batch's per-channel moments a Forward of `rows` samples recorded in `cache`.
  // REQUIRES: that Forward normalised with batch statistics and left no update pending.
  ChannelMoments BatchMomentsOf(const LayerCache& cache, int64_t rows) const;

  // AdaBN / precise BN: running_mean = pooled.mean and running_var = the unbiased variance
  // M2 / (count - 1) of all the values `pooled` describes; num_batches_tracked += batches.
  // REQUIRES: tracking; pooled.count > 1; pooled has num_features channels.
  void ReplaceRunningStats(const ChannelMoments& pooled, int64_t batches);

  // running_mean = 0, running_var = 1, num_batches_tracked = 0 (PyTorch's
  // reset_running_stats). No-op without tracking.
  void ResetRunningStats() override;

  const BatchNormConfig& config() const { return config_; }
  bool tracks_running_stats() const { return config_.track_running_stats; }
  const Tensor& running_mean() const { return running_mean_; }
  const Tensor& running_var() const { return running_var_; }
  int64_t num_batches_tracked() const { return num_batches_tracked_; }
  // REQUIRES: config().affine.
  const Parameter& weight() const { return weight_; }
  const Parameter& bias() const { return bias_; }

 private:
  void ForwardPass(const ConstTensorView& x, Tensor* y, LayerCache* cache,
                   const ForwardContext& ctx, bool relu) const;
  void BackwardPass(const ConstTensorView& x, const ConstTensorView& dy, const LayerCache& cache,
                    const ForwardContext& ctx, Tensor* dx, bool relu);

  // True when this forward normalises with batch statistics. A frozen layer is in eval
  // semantics whatever the model's mode.
  bool UsesBatchStats(const ForwardContext& ctx) const {
    return (ctx.training && !frozen()) || !config_.track_running_stats;
  }

  BatchNormConfig config_;
  bool two_d_;
  int64_t spatial_ = 1;  // S: product of the per-sample dimensions after C

  Parameter weight_;  // gamma, (C); only with affine
  Parameter bias_;    // beta, (C); only with affine
  Tensor running_mean_;  // (C); only with tracking
  Tensor running_var_;   // (C); only with tracking
  int64_t num_batches_tracked_ = 0;
};

}  // namespace normd

#endif  // NORMD_CORE_BATCH_NORM_H_
