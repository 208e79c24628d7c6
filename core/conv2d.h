// 2-D convolution, as PyTorch's nn.Conv2d with square kernels, zero padding, dilation 1 and
// groups 1. Input (N, C_in, H, W), output (N, C_out, H_out, W_out) with
// H_out = (H + 2*padding - kernel) / stride + 1. weight is (C_out, C_in, k, k), bias (C_out);
// both ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = C_in*k*k. Computed per sample as
// im2col + GEMM; Backward recomputes the columns from x rather than caching them.
#ifndef NORMD_CORE_CONV2D_H_
#define NORMD_CORE_CONV2D_H_

#include "core/layer.h"

namespace normd {

class Conv2d : public Layer {
 public:
  explicit Conv2d(const Conv2dConfig& config) : config_(config) {}

  const char* kind_name() const override { return "Conv2d"; }
  Status Build(const Shape& sample_in, Shape* sample_out) override;
  int64_t NumParameters() const override;
  void Allocate(Rng& rng) override;
  void Forward(const ConstTensorView& x, Tensor* y, LayerCache* cache,
               const ForwardContext& ctx) const override;
  void Backward(const ConstTensorView& x, const Tensor& y, const ConstTensorView& dy,
                const LayerCache& cache, const ForwardContext& ctx, Tensor* dx) override;
  std::vector<Parameter*> parameters() override;

 private:
  Conv2dConfig config_;
  int64_t h_ = 0, w_ = 0, h_out_ = 0, w_out_ = 0;
  Parameter weight_;  // (C_out, C_in, k, k)
  Parameter bias_;    // (C_out); only with bias
};

}  // namespace normd

#endif  // NORMD_CORE_CONV2D_H_
