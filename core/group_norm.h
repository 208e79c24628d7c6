// Group Normalization, exactly as PyTorch's nn.GroupNorm, and the per-sample group kernels it
// shares with InstanceNorm (core/instance_norm.h).
//
// Input (N, C, *) row-major (core/tensor.h): per sample, the C channels are split into
// num_groups groups of C / num_groups consecutive channels, and each (sample, group) block of
// (C / num_groups) * S contiguous values (S: the product of the dimensions after C, 1 for
// (N, C)) is normalised by its own mean and biased variance:
//   y = (x - mean) / sqrt(var + eps) * weight[c] + bias[c],
// weight and bias having one value per channel (affine only; initialised to 1 and 0). Train and
// eval behave the same; there are no buffers. Build refuses C not divisible by num_groups.
// PyTorch's input check (F.group_norm's _verify_batch_size, applied in train and eval alike):
// N * (C / num_groups) * S == 1 is an error ("Expected more than 1 value per channel when
// training").
//
// Gradient contract: Forward caches each block's mean and 1/sqrt(var + eps). Backward adds
// dL/dweight and dL/dbias into the parameters' grad and overwrites dx when asked:
//   dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) per block, g = dy * weight[c].
#ifndef NORMD_CORE_GROUP_NORM_H_
#define NORMD_CORE_GROUP_NORM_H_

#include <cstdint>

#include "core/layer.h"

namespace normd {

// The shared kernels. x and y are (n, channels, s) row-major; a block is `channels / groups`
// consecutive channels of one sample, `block = channels / groups * s` contiguous values.
// weight/bias may be null (no affine). stats receives 2 floats per block: mean, rstd.
struct GroupLayout {
  int64_t n = 0;
  int64_t channels = 0;
  int64_t groups = 0;
  int64_t s = 1;
  int64_t channels_per_group() const { return channels / groups; }
  int64_t block() const { return channels_per_group() * s; }
  int64_t blocks() const { return n * groups; }
};

// Normalises every block by its own statistics (biased variance, accumulated in double).
// When block_var is non-null it receives each block's unbiased variance (InstanceNorm's
// running update; REQUIRES block() > 1 then).
void GroupNormForward(const GroupLayout& l, const float* x, const float* weight,
                      const float* bias, float eps, float* y, float* stats,
                      double* block_var_unbiased);

// The backward of GroupNormForward given its stats. dweight/dbias (may be null) are
// accumulated; dx (may be null) is overwritten.
void GroupNormBackward(const GroupLayout& l, const float* x, const float* dy, const float* weight,
                       const float* stats, float* dweight, float* dbias, float* dx);

class GroupNorm : public Layer {
 public:
  explicit GroupNorm(const GroupNormConfig& config) : config_(config) {}

  const char* kind_name() const override { return "GroupNorm"; }
  Status Build(const Shape& sample_in, Shape* sample_out) override;
  int64_t NumParameters() const override;
  void Allocate(Rng& rng) override;
  Status CheckBatch(const Shape& batch_in, const ForwardContext& ctx) const override;
  void Forward(const ConstTensorView& x, Tensor* y, LayerCache* cache,
               const ForwardContext& ctx) const override;
  void Backward(const ConstTensorView& x, const Tensor& y, const ConstTensorView& dy,
                const LayerCache& cache, const ForwardContext& ctx, Tensor* dx) override;
  std::vector<Parameter*> parameters() override;

  const GroupNormConfig& config() const { return config_; }

 private:
  GroupLayout Layout(int64_t n) const;

  GroupNormConfig config_;
  int64_t spatial_ = 1;
  Parameter weight_;  // (C); only with affine
  Parameter bias_;    // (C); only with affine
};

}  // namespace normd

#endif  // NORMD_CORE_GROUP_NORM_H_
