// Linear (fully connected), as PyTorch's nn.Linear: y = x W^T + b.
//
// Input (N, in_features), output (N, out_features). weight is (out_features, in_features)
// row-major, PyTorch's layout, so state moves between the two by name without a transpose.
// Initialisation: weight and bias ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming_uniform with a=sqrt(5)).
// Backward: dW += dy^T x, db += sum over the batch of dy, dx = dy W.
#ifndef NORMD_CORE_LINEAR_H_
#define NORMD_CORE_LINEAR_H_

#include "core/layer.h"

namespace normd {

class Linear : public Layer {
 public:
  explicit Linear(const LinearConfig& config) : config_(config) {}

  const char* kind_name() const override { return "Linear"; }
  Status Build(const Shape& sample_in, Shape* sample_out) override;
  int64_t NumParameters() const override;
  void Allocate(Rng& rng) override;
  void Forward(const ConstTensorView& x, Tensor* y, LayerCache* cache,
               const ForwardContext& ctx) const override;
  void Backward(const ConstTensorView& x, const Tensor& y, const ConstTensorView& dy,
                const LayerCache& cache, const ForwardContext& ctx, Tensor* dx) override;
  std::vector<Parameter*> parameters() override;

  const LinearConfig& config() const { return config_; }

 private:
  LinearConfig config_;
  Parameter weight_;  // (out, in)
  Parameter bias_;    // (out); only with bias
};

}  // namespace normd

#endif  // NORMD_CORE_LINEAR_H_
