#include "core/group_norm.h"

#include <cassert>
#include <cmath>

namespace normd {

void GroupNormForward(const GroupLayout& l, const float* x, const float* weight,
                      const float* bias, float eps, float* y, float* stats,
                      double* block_var_unbiased) {
  const int64_t block = l.block();
  const int64_t cpg = l.channels_per_group();
  for (int64_t b = 0; b < l.blocks(); ++b) {
    const float* xb = x + b * block;
    float* yb = y + b * block;
    // Two passes in double: the mean, then squared deviations (no cancellation).
    double sum = 0.0;
    for (int64_t i = 0; i < block; ++i) sum += xb[i];
    const double mean = sum / static_cast<double>(block);
    double m2 = 0.0;
    for (int64_t i = 0; i < block; ++i) {
      const double d = xb[i] - mean;
      m2 += d * d;
    }
    const double rstd = 1.0 / std::sqrt(m2 / static_cast<double>(block) + double{eps});
    stats[2 * b] = static_cast<float>(mean);
    stats[2 * b + 1] = static_cast<float>(rstd);
    if (block_var_unbiased != nullptr) {
      block_var_unbiased[b] = m2 / static_cast<double>(block - 1);
    }
    // One multiply-add per element: y = x * scale + shift with per-channel scale and shift.
    const int64_t first_channel = (b % l.groups) * cpg;
    for (int64_t k = 0; k < cpg; ++k) {
      const int64_t c = first_channel + k;
      const double w = weight != nullptr ? weight[c] : 1.0;
      const double bb = bias != nullptr ? bias[c] : 0.0;
      const float scale = static_cast<float>(rstd * w);
      const float shift = static_cast<float>(bb - mean * rstd * w);
      const float* xc = xb + k * l.s;
      float* yc = yb + k * l.s;
      for (int64_t i = 0; i < l.s; ++i) yc[i] = xc[i] * scale + shift;
    }
  }
}

void GroupNormBackward(const GroupLayout& l, const float* x, const float* dy, const float* weight,
                       const float* stats, float* dweight, float* dbias, float* dx) {
  const int64_t block = l.block();
  const int64_t cpg = l.channels_per_group();
  const double inv_block = 1.0 / static_cast<double>(block);
  for (int64_t b = 0; b < l.blocks(); ++b) {
    const float* xb = x + b * block;
    const float* dyb = dy + b * block;
    const double mean = stats[2 * b];
    const double rstd = stats[2 * b + 1];
    const int64_t first_channel = (b % l.groups) * cpg;
    // Per channel: sum(dy) and sum(dy * xhat); with g = dy * w, the block's sums of g and
    // g * xhat follow by weighting them with w.
    double sum_g = 0.0, sum_gx = 0.0;
    for (int64_t k = 0; k < cpg; ++k) {
      const int64_t c = first_channel + k;
      const float* xc = xb + k * l.s;
      const float* dyc = dyb + k * l.s;
      double sdy = 0.0, sdyx = 0.0;
      for (int64_t i = 0; i < l.s; ++i) {
        sdy += dyc[i];
        sdyx += dyc[i] * ((xc[i] - mean) * rstd);
      }
      if (dweight != nullptr) dweight[c] += static_cast<float>(sdyx);
      if (dbias != nullptr) dbias[c] += static_cast<float>(sdy);
      const double w = weight != nullptr ? weight[c] : 1.0;
      sum_g += w * sdy;
      sum_gx += w * sdyx;
    }
    if (dx == nullptr) continue;
    const double mean_g = sum_g * inv_block;
    const double mean_gx = sum_gx * inv_block;
    float* dxb = dx + b * block;
    for (int64_t k = 0; k < cpg; ++k) {
      const int64_t c = first_channel + k;
      const double w = weight != nullptr ? weight[c] : 1.0;
      const float* xc = xb + k * l.s;
      const float* dyc = dyb + k * l.s;
      float* dxc = dxb + k * l.s;
      for (int64_t i = 0; i < l.s; ++i) {
        const double xhat = (xc[i] - mean) * rstd;
        dxc[i] = static_cast<float>(rstd * (dyc[i] * w - mean_g - xhat * mean_gx));
      }
    }
  }
}

Status GroupNorm::Build(const Shape& in, Shape* out) {
  const GroupNormConfig& c = config_;
  if (c.num_groups <= 0) return InvalidArgument("num_groups must be positive, got ", c.num_groups);
  if (c.num_channels <= 0) {
    return InvalidArgument("num_channels must be positive, got ", c.num_channels);
  }
  if (c.num_channels % c.num_groups != 0) {
    return InvalidArgument("num_channels (", c.num_channels, ") must be divisible by num_groups (",
                           c.num_groups, ")");
  }
  if (!(c.eps > 0.0f) || !std::isfinite(c.eps)) return InvalidArgument("eps must be > 0, got ", c.eps);
  if (in.rank() < 1) return InvalidArgument("expects a per-sample input (C, *), got ", in.ToString());
  if (in[0] != c.num_channels) {
    return InvalidArgument("num_channels is ", c.num_channels, " but the previous layer produces ",
                           in[0], in.rank() == 1 ? " features" : " channels");
  }
  spatial_ = in.DropFirst().NumElements();
  *out = in;
  return Status::Ok();
}

int64_t GroupNorm::NumParameters() const { return config_.affine ? 2 * config_.num_channels : 0; }

void GroupNorm::Allocate(Rng& /*rng*/) {
  if (!config_.affine) return;
  const Shape c{config_.num_channels};
  weight_ = Parameter{"weight", Tensor(c, 1.0f), Tensor(c, 0.0f)};
  bias_ = Parameter{"bias", Tensor(c, 0.0f), Tensor(c, 0.0f)};
}

std::vector<Parameter*> GroupNorm::parameters() {
  if (!config_.affine) return {};
  return {&weight_, &bias_};
}

Status GroupNorm::CheckBatch(const Shape& batch_in, const ForwardContext& /*ctx*/) const {
  const int64_t per_group = config_.num_channels / config_.num_groups;
  if (SaturatingMul(SaturatingMul(batch_in[0], per_group), spatial_) == 1) {
    return InvalidArgument("Expected more than 1 value per channel when training, got input size ",
                           batch_in.ToString());
  }
  return Status::Ok();
}

GroupLayout GroupNorm::Layout(int64_t n) const {
  GroupLayout l;
  l.n = n;
  l.channels = config_.num_channels;
  l.groups = config_.num_groups;
  l.s = spatial_;
  return l;
}

void GroupNorm::Forward(const ConstTensorView& x, Tensor* y, LayerCache* cache,
                        const ForwardContext& /*ctx*/) const {
  y->Resize(x.shape);
  const GroupLayout l = Layout(x.rows());
  cache->f.resize(2 * l.blocks());
  const bool affine = config_.affine;
  GroupNormForward(l, x.data, affine ? weight_.value.data() : nullptr,
                   affine ? bias_.value.data() : nullptr, config_.eps, y->data(), cache->f.data(),
                   nullptr);
}

void GroupNorm::Backward(const ConstTensorView& x, const Tensor& /*y*/, const ConstTensorView& dy,
                         const LayerCache& cache, const ForwardContext& /*ctx*/, Tensor* dx) {
  const GroupLayout l = Layout(x.rows());
  assert(static_cast<int64_t>(cache.f.size()) == 2 * l.blocks());
  if (dx != nullptr) dx->Resize(x.shape);
  const bool grads = config_.affine && trainable();
  GroupNormBackward(l, x.data, dy.data, config_.affine ? weight_.value.data() : nullptr,
                    cache.f.data(), grads ? weight_.grad.data() : nullptr,
                    grads ? bias_.grad.data() : nullptr, dx != nullptr ? dx->data() : nullptr);
}

}  // namespace normd
