#include "core/layer_norm.h"

#include <cassert>
#include <cmath>

namespace normd {
namespace {

using ArrayMap = Eigen::Map<Eigen::ArrayXf>;
using ConstArrayMap = Eigen::Map<const Eigen::ArrayXf>;

std::string ShapeString(const std::vector<int64_t>& dims) {
  Shape s;
  if (!Shape::FromVector(dims, &s)) return "(too many dimensions)";
  return s.ToString();
}

}  // namespace

Status LayerNorm::Build(const Shape& sample_in, Shape* sample_out) {
  const std::vector<int64_t>& ns = config_.normalized_shape;
  if (ns.empty()) return InvalidArgument("normalized_shape must not be empty");
  for (int64_t d : ns) {
    if (d <= 0) {
      return InvalidArgument("normalized_shape must have positive dimensions, got ",
                             ShapeString(ns));
    }
  }
  if (!(config_.eps >= 0.0f) || !std::isfinite(config_.eps)) {
    return InvalidArgument("eps must be a non-negative number, got ", config_.eps);
  }
  const int rank = static_cast<int>(ns.size());
  if (rank > sample_in.rank()) {
    return InvalidArgument("normalized_shape ", ShapeString(ns),
                           " has more dimensions than the per-sample input ",
                           sample_in.ToString());
  }
  Shape trailing;
  for (int i = sample_in.rank() - rank; i < sample_in.rank(); ++i) trailing.push_back(sample_in[i]);
  for (int i = 0; i < rank; ++i) {
    if (trailing[i] != ns[i]) {
      return InvalidArgument("normalized_shape is ", ShapeString(ns),
                             " but the per-sample input's trailing dimensions are ",
                             trailing.ToString());
    }
  }
  group_ = trailing.NumElements();
  *sample_out = sample_in;
  return Status::Ok();
}

int64_t LayerNorm::NumParameters() const {
  if (!config_.elementwise_affine) return 0;
  return SaturatingMul(group_, 2);
}

void LayerNorm::Allocate(Rng& /*rng*/) {
  if (!config_.elementwise_affine) return;
  Shape shape;
  Shape::FromVector(config_.normalized_shape, &shape);  // validated by Build
  weight_.name = "weight";
  weight_.value = Tensor(shape, 1.0f);
  weight_.grad = Tensor(shape, 0.0f);
  bias_.name = "bias";
  bias_.value = Tensor(shape, 0.0f);
  bias_.grad = Tensor(shape, 0.0f);
}

std::vector<Parameter*> LayerNorm::parameters() {
  if (!config_.elementwise_affine) return {};
  return {&weight_, &bias_};
}

// Cache: f[2r] = mean of row r, f[2r + 1] = 1 / sqrt(var + eps), rows being the groups of
// group_ consecutive elements normalised together.
void LayerNorm::Forward(const ConstTensorView& x, Tensor* y, LayerCache* cache,
                        const ForwardContext& /*ctx*/) const {
  y->Resize(x.shape);
  const int64_t g = group_;
  const int64_t rows = g == 0 ? 0 : x.size() / g;
  cache->f.resize(2 * rows);
  const bool affine = config_.elementwise_affine;
  const float eps = config_.eps;
  for (int64_t r = 0; r < rows; ++r) {
    ConstArrayMap xr(x.data + r * g, g);
    // Two passes (mean, then squared deviations) keep the variance free of cancellation; Eigen's
    // vectorised sums accumulate in several partial sums, accurate enough for float rows.
    const float m = xr.sum() / static_cast<float>(g);
    const float var = (xr - m).square().sum() / static_cast<float>(g);
    const float rstd = 1.0f / std::sqrt(var + eps);
    cache->f[2 * r] = m;
    cache->f[2 * r + 1] = rstd;
    ArrayMap yr(y->data() + r * g, g);
    if (affine) {
      yr = (xr - m) * rstd * ConstArrayMap(weight_.value.data(), g) +
           ConstArrayMap(bias_.value.data(), g);
    } else {
      yr = (xr - m) * rstd;
    }
  }
}

// With xhat = (x - mean) * rstd and g = dy * weight, per row (fused expressions, no temporaries):
//   dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),
//   dweight += dy * xhat, dbias += dy (summed over rows).
void LayerNorm::Backward(const ConstTensorView& x, const Tensor& /*y*/,
                         const ConstTensorView& dy, const LayerCache& cache,
                         const ForwardContext& /*ctx*/, Tensor* dx) {
  const int64_t g = group_;
  const int64_t rows = g == 0 ? 0 : x.size() / g;
  assert(static_cast<int64_t>(cache.f.size()) == 2 * rows);
  const bool affine = config_.elementwise_affine;
  if (dx != nullptr) dx->Resize(x.shape);
  const float inv_g = 1.0f / static_cast<float>(g);
  for (int64_t r = 0; r < rows; ++r) {
    const float m = cache.f[2 * r];
    const float rstd = cache.f[2 * r + 1];
    ConstArrayMap xr(x.data + r * g, g);
    ConstArrayMap dyr(dy.data + r * g, g);
    const auto xhat = (xr - m) * rstd;
    if (affine) {
      ArrayMap(weight_.grad.data(), g) += dyr * xhat;
      ArrayMap(bias_.grad.data(), g) += dyr;
    }
    if (dx == nullptr) continue;
    ArrayMap dxr(dx->data() + r * g, g);
    if (affine) {
      ConstArrayMap w(weight_.value.data(), g);
      const float mean_g = (dyr * w).sum() * inv_g;
      const float mean_gx = (dyr * w * xhat).sum() * inv_g;
      dxr = rstd * (dyr * w - mean_g - xhat * mean_gx);
    } else {
      const float mean_g = dyr.sum() * inv_g;
      const float mean_gx = (dyr * xhat).sum() * inv_g;
      dxr = rstd * (dyr - mean_g - xhat * mean_gx);
    }
  }
}

}  // namespace normd
