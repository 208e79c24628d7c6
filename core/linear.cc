#include "core/linear.h"

#include <cmath>

#include "core/threads.h"

namespace normd {

Status Linear::Build(const Shape& in, Shape* out) {
  if (config_.in_features <= 0) {
    return InvalidArgument("in_features must be positive, got ", config_.in_features);
  }
  if (config_.out_features <= 0) {
    return InvalidArgument("out_features must be positive, got ", config_.out_features);
  }
  if (in.rank() != 1) {
    return InvalidArgument("expects a 1-D per-sample input (features), got ", in.ToString(),
                           "; add a Flatten before it");
  }
  if (in[0] != config_.in_features) {
    return InvalidArgument("in_features is ", config_.in_features,
                           " but the previous layer produces ", in[0], " features");
  }
  *out = Shape{config_.out_features};
  return Status::Ok();
}

int64_t Linear::NumParameters() const {
  const int64_t w = SaturatingMul(config_.in_features, config_.out_features);
  return config_.bias ? w + config_.out_features : w;
}

void Linear::Allocate(Rng& rng) {
  const float bound = 1.0f / std::sqrt(static_cast<float>(config_.in_features));
  const Shape w{config_.out_features, config_.in_features};
  weight_ = Parameter{"weight", Tensor(w), Tensor(w)};
  for (int64_t i = 0; i < weight_.value.size(); ++i) {
    weight_.value.data()[i] = rng.Uniform(-bound, bound);
  }
  if (config_.bias) {
    const Shape b{config_.out_features};
    bias_ = Parameter{"bias", Tensor(b), Tensor(b)};
    for (int64_t i = 0; i < bias_.value.size(); ++i) {
      bias_.value.data()[i] = rng.Uniform(-bound, bound);
    }
  }
}

void Linear::Forward(const ConstTensorView& x, Tensor* y, LayerCache* /*cache*/,
                     const ForwardContext& /*ctx*/) const {
  internal::ApplyComputeThreads();
  const int64_t n = x.rows();
  const int64_t work = n * config_.in_features * config_.out_features;
  y->Resize(Shape{n, config_.out_features});
  if (n == 0) return;  // an empty data-parallel shard (core/collective.h)
  MatrixMap out = y->matrix();
  // Large products split by rows of the batch across two cores (core/threads.h).
  SplitInTwo(n, kProductSplitAlign, work, [&](int64_t r0, int64_t r1) {
    out.middleRows(r0, r1 - r0).noalias() =
        x.matrix().middleRows(r0, r1 - r0) * weight_.value.matrix().transpose();
  });
  if (config_.bias) out.rowwise() += bias_.value.flat().transpose();
}

void Linear::Backward(const ConstTensorView& x, const Tensor& /*y*/, const ConstTensorView& dy,
                      const LayerCache& /*cache*/, const ForwardContext& /*ctx*/, Tensor* dx) {
  internal::ApplyComputeThreads();
  const int64_t n = x.rows();
  if (n == 0) {  // an empty data-parallel shard adds no gradient
    if (dx != nullptr) dx->Resize(x.shape);
    return;
  }
  const ConstMatrixMap g = dy.matrix();
  const int64_t work = n * config_.in_features * config_.out_features;
  // Large products split across two cores (core/threads.h): dW by its rows (output features),
  // dx by rows of the batch.
  // An untrainable layer's gradients stay zero (Layer::trainable): dW is not computed.
  if (trainable()) {
    MatrixMap dw = weight_.grad.matrix();
    SplitInTwo(config_.out_features, kProductSplitAlign, work, [&](int64_t r0, int64_t r1) {
      dw.middleRows(r0, r1 - r0).noalias() += g.middleCols(r0, r1 - r0).transpose() * x.matrix();
    });
    if (config_.bias) bias_.grad.flat() += g.colwise().sum().transpose();
  }
  if (dx != nullptr) {
    dx->Resize(x.shape);
    MatrixMap d = dx->matrix();
    SplitInTwo(n, kProductSplitAlign, work, [&](int64_t r0, int64_t r1) {
      d.middleRows(r0, r1 - r0).noalias() = g.middleRows(r0, r1 - r0) * weight_.value.matrix();
    });
  }
}

std::vector<Parameter*> Linear::parameters() {
  if (config_.bias) return {&weight_, &bias_};
  return {&weight_};
}

}  // namespace normd
