// 2-D convolution, as PyTorch's nn.Conv2d with square kernels, zero padding and dilation 1.
// Input (N, C_in, H, W), output (N, C_out, H_out, W_out) with
// H_out = (H + 2*padding - kernel) / stride + 1.
//
// Groups (PyTorch's `groups`): the input channels split into G groups of C_in/G and the output
// channels into G groups of C_out/G; output group g sees input group g only (G = C_in is a
// depthwise convolution). weight is (C_out, C_in/G, k, k), bias (C_out); both
// ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = C_in/G*k*k.
//
// Computed by DirectConvolution (core/conv2d_direct.h) when groups = 1 and the kernel is larger
// than 1x1: register-tiled direct kernels for the forward pass and both gradients. Grouped and
// 1x1 convolutions (plain matrix products) run per sample as im2col + GEMM: the columns of all
// input channels are unfolded once and each group multiplies its own block of weight rows with
// its own block of column rows (one GEMM per group); backward recomputes the columns from x
// rather than caching them.
//
// Gradient contract: Forward caches nothing; Backward accumulates into weight and bias grads
// (skipped for an untrainable layer) and overwrites dx.
#ifndef NORMD_CORE_CONV2D_H_
#define NORMD_CORE_CONV2D_H_

#include "core/conv2d_direct.h"
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
  // The im2col + GEMM paths (see the file comment).
  void Im2ColForward(const ConstTensorView& x, Tensor* y) const;
  void Im2ColWeightGradient(const ConstTensorView& x, const ConstTensorView& dy);
  void Col2ImInputGradient(const ConstTensorView& dy, Tensor* dx) const;

  Conv2dConfig config_;
  bool direct_ = false;  // groups == 1: DirectConvolution computes what it can
  DirectConvolution direct_conv_;
  int64_t h_ = 0, w_ = 0, h_out_ = 0, w_out_ = 0;
  Parameter weight_;  // (C_out, C_in / groups, k, k)
  Parameter bias_;    // (C_out); only with bias
};

}  // namespace normd

#endif  // NORMD_CORE_CONV2D_H_
