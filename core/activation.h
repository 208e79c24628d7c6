// Element-wise activations and shape-only layers, as PyTorch's nn.ReLU, nn.LeakyReLU,
// nn.Tanh, nn.Sigmoid, nn.GELU (exact erf form: x * Phi(x)), nn.Dropout and nn.Flatten.
// None has parameters. Backward uses the cached input or output as each derivative needs.
//
// Dropout is inverted dropout: in training each element is zeroed with probability p and the
// rest scaled by 1/(1-p); the mask (already scaled) is cached for Backward. In eval it is the
// identity. Masks are drawn from ForwardContext::rng.
//
// Flatten (start_dim=1) turns (N, d1, d2, ...) into (N, d1*d2*...).
#ifndef NORMD_CORE_ACTIVATION_H_
#define NORMD_CORE_ACTIVATION_H_

#include "core/layer.h"

namespace normd {

class Activation : public Layer {
 public:
  // REQUIRES: kind is one of kReLU, kLeakyReLU, kTanh, kSigmoid, kGELU.
  Activation(LayerKind kind, float negative_slope) : kind_(kind), slope_(negative_slope) {}

  const char* kind_name() const override { return LayerKindName(kind_); }
  LayerKind kind() const { return kind_; }
  Status Build(const Shape& sample_in, Shape* sample_out) override;
  void Forward(const ConstTensorView& x, Tensor* y, LayerCache* cache,
               const ForwardContext& ctx) const override;
  void Backward(const ConstTensorView& x, const Tensor& y, const ConstTensorView& dy,
                const LayerCache& cache, const ForwardContext& ctx, Tensor* dx) override;

 private:
  LayerKind kind_;
  float slope_;
};

class Dropout : public Layer {
 public:
  explicit Dropout(float p) : p_(p) {}

  const char* kind_name() const override { return "Dropout"; }
  Status Build(const Shape& sample_in, Shape* sample_out) override;
  void Forward(const ConstTensorView& x, Tensor* y, LayerCache* cache,
               const ForwardContext& ctx) const override;
  void Backward(const ConstTensorView& x, const Tensor& y, const ConstTensorView& dy,
                const LayerCache& cache, const ForwardContext& ctx, Tensor* dx) override;

 private:
  float p_;
};

class Flatten : public Layer {
 public:
  const char* kind_name() const override { return "Flatten"; }
  Status Build(const Shape& sample_in, Shape* sample_out) override;
  void Forward(const ConstTensorView& x, Tensor* y, LayerCache* cache,
               const ForwardContext& ctx) const override;
  void Backward(const ConstTensorView& x, const Tensor& y, const ConstTensorView& dy,
                const LayerCache& cache, const ForwardContext& ctx, Tensor* dx) override;
};

}  // namespace normd

#endif  // NORMD_CORE_ACTIVATION_H_
