#include "core/activation.h"

#include <algorithm>
#include <cassert>
#include <cmath>
#include <cstdint>

#include <unsupported/Eigen/SpecialFunctions>  // vectorised erf (Eigen 3.4's rational form)

namespace normd {
namespace {

using ArrayMap = Eigen::Map<Eigen::ArrayXf>;
using ConstArrayMap = Eigen::Map<const Eigen::ArrayXf>;

constexpr float kInvSqrt2 = 0.70710678118654752440f;
constexpr float kInvSqrt2Pi = 0.39894228040143267794f;

}  // namespace

Status Activation::Build(const Shape& sample_in, Shape* sample_out) {
  *sample_out = sample_in;
  return Status::Ok();
}

void Activation::Forward(const ConstTensorView& x, Tensor* y, LayerCache* /*cache*/,
                         const ForwardContext& /*ctx*/) const {
  y->Resize(x.shape);
  const int64_t n = x.size();
  const float* in = x.data;
  float* out = y->data();
  switch (kind_) {
    case LayerKind::kReLU:
      for (int64_t i = 0; i < n; ++i) out[i] = in[i] > 0.0f ? in[i] : 0.0f;
      break;
    case LayerKind::kLeakyReLU: {
      const float slope = slope_;
      for (int64_t i = 0; i < n; ++i) out[i] = in[i] > 0.0f ? in[i] : in[i] * slope;
      break;
    }
    case LayerKind::kTanh:
      ArrayMap(out, n) = ConstArrayMap(in, n).tanh();
      break;
    case LayerKind::kSigmoid:
      // exp is vectorised by Eigen; for x < -88 exp overflows to inf and the result is 0.
      ArrayMap(out, n) = ((-ConstArrayMap(in, n)).exp() + 1.0f).inverse();
      break;
    case LayerKind::kGELU: {
      ConstArrayMap v(in, n);
      ArrayMap(out, n) = 0.5f * v * (1.0f + (v * kInvSqrt2).erf());
      break;
    }
    default:
      assert(false && "Activation constructed with a non-activation kind");
  }
}

void Activation::Backward(const ConstTensorView& x, const Tensor& y, const ConstTensorView& dy,
                          const LayerCache& /*cache*/, const ForwardContext& /*ctx*/,
                          Tensor* dx) {
  if (dx == nullptr) return;
  dx->Resize(x.shape);
  const int64_t n = x.size();
  const float* in = x.data;
  const float* g = dy.data;
  float* out = dx->data();
  switch (kind_) {
    case LayerKind::kReLU: {
      const float* yv = y.data();
      for (int64_t i = 0; i < n; ++i) out[i] = yv[i] > 0.0f ? g[i] : 0.0f;
      break;
    }
    case LayerKind::kLeakyReLU: {
      const float slope = slope_;
      for (int64_t i = 0; i < n; ++i) out[i] = in[i] > 0.0f ? g[i] : g[i] * slope;
      break;
    }
    case LayerKind::kTanh: {
      ConstArrayMap yv(y.data(), n);
      ArrayMap(out, n) = ConstArrayMap(g, n) * (1.0f - yv.square());
      break;
    }
    case LayerKind::kSigmoid: {
      ConstArrayMap yv(y.data(), n);
      ArrayMap(out, n) = ConstArrayMap(g, n) * yv * (1.0f - yv);
      break;
    }
    case LayerKind::kGELU: {
      // d/dx [x * Phi(x)] = Phi(x) + x * phi(x).
      ConstArrayMap v(in, n);
      ArrayMap(out, n) = ConstArrayMap(g, n) * (0.5f * (1.0f + (v * kInvSqrt2).erf()) +
                                                v * kInvSqrt2Pi * (-0.5f * v.square()).exp());
      break;
    }
    default:
      assert(false && "Activation constructed with a non-activation kind");
  }
}

Status Dropout::Build(const Shape& sample_in, Shape* sample_out) {
  if (!(p_ >= 0.0f && p_ <= 1.0f)) {
    return InvalidArgument("dropout probability must be between 0 and 1, got ", p_);
  }
  *sample_out = sample_in;
  return Status::Ok();
}

// The cache holds the scaled mask (0 or 1/(1-p)) when the forward dropped elements, and is
// empty when it was the identity (eval, or p = 0).
void Dropout::Forward(const ConstTensorView& x, Tensor* y, LayerCache* cache,
                      const ForwardContext& ctx) const {
  y->Resize(x.shape);
  const int64_t n = x.size();
  if (!ctx.training || ctx.adapting || p_ == 0.0f) {
    cache->f.clear();
    std::copy(x.data, x.data + n, y->data());
    return;
  }
  assert(ctx.rng != nullptr);
  Rng& rng = *ctx.rng;
  const float p = p_;
  // p = 1 drops everything; PyTorch returns zeros rather than 0 * inf.
  const float scale = p < 1.0f ? 1.0f / (1.0f - p) : 0.0f;
  cache->f.resize(n);
  float* mask = cache->f.data();
  // Each 64-bit draw yields two independent 24-bit uniforms u = k / 2^24; u < p exactly when
  // k < ceil(p * 2^24).
  const uint32_t threshold = static_cast<uint32_t>(std::ceil(double{p} * 16777216.0));
  // Arithmetic rather than a branch: a random keep/drop decision would mispredict half the time.
  auto keep = [threshold, scale](uint64_t k) { return static_cast<float>(k >= threshold) * scale; };
  if (!ctx.shard.active()) {
    int64_t i = 0;
    for (; i + 1 < n; i += 2) {
      const uint64_t r = rng.Next();
      mask[i] = keep(r >> 40);
      mask[i + 1] = keep((r >> 16) & 0xFFFFFF);
    }
    if (i < n) mask[i] = keep(rng.Next() >> 40);
  } else {
    // Data-parallel: draw the whole batch's mask, as one process would, and keep this shard's
    // rows of it, so the result does not depend on how many ranks there are. Element e of the
    // whole batch takes the upper (even e) or lower (odd e) 24 bits of draw e / 2.
    const int64_t per_row = x.shape.DropFirst().NumElements();
    const int64_t begin = ctx.shard.row_offset * per_row;
    const int64_t total = ctx.shard.global_rows * per_row;
    for (int64_t e = 0; e < total; e += 2) {
      const uint64_t r = rng.Next();
      if (e + 1 < begin || e >= begin + n) continue;
      if (e >= begin) mask[e - begin] = keep(r >> 40);
      if (e + 1 >= begin && e + 1 < begin + n) mask[e + 1 - begin] = keep((r >> 16) & 0xFFFFFF);
    }
  }
  ArrayMap(y->data(), n) = ConstArrayMap(x.data, n) * ConstArrayMap(mask, n);
}

void Dropout::Backward(const ConstTensorView& x, const Tensor& /*y*/, const ConstTensorView& dy,
                       const LayerCache& cache, const ForwardContext& /*ctx*/, Tensor* dx) {
  if (dx == nullptr) return;
  dx->Resize(x.shape);
  const int64_t n = x.size();
  if (cache.f.empty()) {
    std::copy(dy.data, dy.data + n, dx->data());
    return;
  }
  assert(static_cast<int64_t>(cache.f.size()) == n);
  ArrayMap(dx->data(), n) = ConstArrayMap(dy.data, n) * ConstArrayMap(cache.f.data(), n);
}

Status Flatten::Build(const Shape& sample_in, Shape* sample_out) {
  if (sample_in.rank() < 1) {
    return InvalidArgument("expects at least a 1-D per-sample input, got ",
                           sample_in.ToString());
  }
  *sample_out = Shape{sample_in.NumElements()};
  return Status::Ok();
}

void Flatten::Forward(const ConstTensorView& x, Tensor* y, LayerCache* /*cache*/,
                      const ForwardContext& /*ctx*/) const {
  y->Resize(Shape{x.shape[0], x.shape.DropFirst().NumElements()});
  std::copy(x.data, x.data + x.size(), y->data());
}

void Flatten::Backward(const ConstTensorView& x, const Tensor& /*y*/, const ConstTensorView& dy,
                       const LayerCache& /*cache*/, const ForwardContext& /*ctx*/, Tensor* dx) {
  if (dx == nullptr) return;
  dx->Resize(x.shape);
  std::copy(dy.data, dy.data + dy.size(), dx->data());
}

}  // namespace normd
