// 2-D max and average pooling, as PyTorch's nn.MaxPool2d / nn.AvgPool2d (square windows,
// dilation 1, ceil_mode=false; AvgPool2d with count_include_pad=true). Input (N, C, H, W).
// Padding must be at most kernel_size / 2 (PyTorch's rule); max pooling pads with -inf,
// average pooling with zeros that count in the divisor (always kernel_size^2).
// MaxPool2d caches the argmax of every window; its gradient goes to that element.
#ifndef NORMD_CORE_POOL2D_H_
#define NORMD_CORE_POOL2D_H_

#include "core/layer.h"

namespace normd {

class Pool2d : public Layer {
 public:
  Pool2d(const Pool2dConfig& config, bool max) : config_(config), max_(max) {}

  const char* kind_name() const override { return max_ ? "MaxPool2d" : "AvgPool2d"; }
  Status Build(const Shape& sample_in, Shape* sample_out) override;
  void Forward(const ConstTensorView& x, Tensor* y, LayerCache* cache,
               const ForwardContext& ctx) const override;
  void Backward(const ConstTensorView& x, const Tensor& y, const ConstTensorView& dy,
                const LayerCache& cache, const ForwardContext& ctx, Tensor* dx) override;

 private:
  // The layer's passes over planes [p0, p1) of the batch (planes are (sample, channel) pairs);
  // arg is the cached argmax (MaxPool2d only).
  void ForwardPlanes(const float* x, int64_t p0, int64_t p1, float* y, int32_t* arg) const;
  void BackwardPlanes(const float* dy, const int32_t* arg, int64_t p0, int64_t p1,
                      float* dx) const;

  Pool2dConfig config_;  // stride resolved to kernel_size by Build when 0
  bool max_;
  int64_t c_ = 0, h_ = 0, w_ = 0, h_out_ = 0, w_out_ = 0;
};

// Global average pooling, as PyTorch's nn.AdaptiveAvgPool2d((1, 1)): (N, C, H, W) ->
// (N, C, 1, 1), each output the mean of its input plane (summed in double, rounded once).
// Forward caches nothing; Backward overwrites dx with dy / (H * W) spread over each plane.
class AdaptiveAvgPool2d : public Layer {
 public:
  const char* kind_name() const override { return "AdaptiveAvgPool2d"; }
  Status Build(const Shape& sample_in, Shape* sample_out) override;
  void Forward(const ConstTensorView& x, Tensor* y, LayerCache* cache,
               const ForwardContext& ctx) const override;
  void Backward(const ConstTensorView& x, const Tensor& y, const ConstTensorView& dy,
                const LayerCache& cache, const ForwardContext& ctx, Tensor* dx) override;

 private:
  int64_t c_ = 0, plane_ = 0;  // channels, H * W
};

}  // namespace normd

#endif  // NORMD_CORE_POOL2D_H_
