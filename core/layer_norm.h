// Layer Normalization, as PyTorch's nn.LayerNorm.
//
// Normalises each sample over its trailing dimensions given by normalized_shape (which must
// equal the last dimensions of the per-sample input shape) with the biased variance:
// y = (x - mean) / sqrt(var + eps) * weight + bias. weight and bias have shape
// normalized_shape (only with elementwise_affine), initialised to 1 and 0. Train and eval
// behave the same. Cache: per-row mean and 1/sqrt(var + eps).
#ifndef NORMD_CORE_LAYER_NORM_H_
#define NORMD_CORE_LAYER_NORM_H_

#include "core/layer.h"

namespace normd {

class LayerNorm : public Layer {
 public:
  explicit LayerNorm(const LayerNormConfig& config) : config_(config) {}

  const char* kind_name() const override { return "LayerNorm"; }
  Status Build(const Shape& sample_in, Shape* sample_out) override;
  int64_t NumParameters() const override;
  void Allocate(Rng& rng) override;
  void Forward(const ConstTensorView& x, Tensor* y, LayerCache* cache,
               const ForwardContext& ctx) const override;
  void Backward(const ConstTensorView& x, const Tensor& y, const ConstTensorView& dy,
                const LayerCache& cache, const ForwardContext& ctx, Tensor* dx) override;
  std::vector<Parameter*> parameters() override;

 private:
  LayerNormConfig config_;
  int64_t group_ = 0;  // elements normalised together: product of normalized_shape
  Parameter weight_;
  Parameter bias_;
};

}  // namespace normd

#endif  // NORMD_CORE_LAYER_NORM_H_
