#include "core/instance_norm.h"

#include <cassert>
#include <cmath>

namespace normd {
namespace {

// LayerCache::d with a pending running update: [0, C) the batch's mean of the instance means,
// [C, 2C) its mean of the instance unbiased variances, then N*C instance variances (scratch).
constexpr int64_t kBatchMean = 0;

}  // namespace

Status InstanceNorm::Build(const Shape& in, Shape* out) {
  const InstanceNormConfig& c = config_;
  if (c.num_features <= 0) {
    return InvalidArgument("num_features must be positive, got ", c.num_features);
  }
  if (!(c.eps > 0.0f) || !std::isfinite(c.eps)) return InvalidArgument("eps must be > 0, got ", c.eps);
  if (!(c.momentum >= 0.0f && c.momentum <= 1.0f)) {
    return InvalidArgument("momentum must be in [0, 1], got ", c.momentum);
  }
  if (two_d_ && in.rank() != 3) {
    return InvalidArgument("expects a 3-D per-sample input (C, H, W), got ", in.ToString());
  }
  if (!two_d_ && in.rank() != 2) {
    return InvalidArgument("expects a 2-D per-sample input (C, L), got ", in.ToString());
  }
  if (in[0] != c.num_features) {
    return InvalidArgument("num_features is ", c.num_features, " but the previous layer produces ",
                           in[0], " channels");
  }
  spatial_ = in.DropFirst().NumElements();
  *out = in;
  return Status::Ok();
}

int64_t InstanceNorm::NumParameters() const {
  return config_.affine ? 2 * config_.num_features : 0;
}

void InstanceNorm::Allocate(Rng& /*rng*/) {
  const Shape c{config_.num_features};
  if (config_.affine) {
    weight_ = Parameter{"weight", Tensor(c, 1.0f), Tensor(c, 0.0f)};
    bias_ = Parameter{"bias", Tensor(c, 0.0f), Tensor(c, 0.0f)};
  }
  if (config_.track_running_stats) {
    running_mean_ = Tensor(c, 0.0f);
    running_var_ = Tensor(c, 1.0f);
    num_batches_tracked_ = 0;
  }
}

std::vector<Parameter*> InstanceNorm::parameters() {
  if (!config_.affine) return {};
  return {&weight_, &bias_};
}

std::vector<StateSlot> InstanceNorm::state() {
  std::vector<StateSlot> slots = Layer::state();
  if (config_.track_running_stats) {
    slots.push_back(StateSlot{"running_mean", &running_mean_, nullptr});
    slots.push_back(StateSlot{"running_var", &running_var_, nullptr});
    slots.push_back(StateSlot{"num_batches_tracked", nullptr, &num_batches_tracked_});
  }
  return slots;
}

Status InstanceNorm::CheckBatch(const Shape& batch_in, const ForwardContext& ctx) const {
  if (UsesInstanceStats(ctx) && spatial_ == 1) {
    return InvalidArgument("Expected more than 1 spatial element when training, got input size ",
                           batch_in.ToString());
  }
  return Status::Ok();
}

GroupLayout InstanceNorm::Layout(int64_t n) const {
  GroupLayout l;
  l.n = n;
  l.channels = config_.num_features;
  l.groups = config_.num_features;
  l.s = spatial_;
  return l;
}

void InstanceNorm::Forward(const ConstTensorView& x, Tensor* y, LayerCache* cache,
                           const ForwardContext& ctx) const {
  y->Resize(x.shape);
  const GroupLayout l = Layout(x.rows());
  const int64_t C = config_.num_features;
  const float* w = config_.affine ? weight_.value.data() : nullptr;
  const float* b = config_.affine ? bias_.value.data() : nullptr;
  cache->has_pending_update = false;
  if (UsesInstanceStats(ctx)) {
    cache->f.resize(2 * l.blocks());
    const bool update = ctx.training && ctx.update_running_stats && config_.track_running_stats;
    double* inst_var = nullptr;
    if (update) {
      cache->d.resize(2 * C + l.blocks());
      inst_var = cache->d.data() + 2 * C;
    }
    GroupNormForward(l, x.data, w, b, config_.eps, y->data(), cache->f.data(), inst_var);
    if (update) {
      // Each instance updates a copy of the running statistics and PyTorch keeps their mean,
      // which is the update with the batch's mean of the instance statistics.
      const double inv_n = 1.0 / static_cast<double>(l.n);
      for (int64_t c = 0; c < C; ++c) {
        double mean_sum = 0.0, var_sum = 0.0;
        for (int64_t n = 0; n < l.n; ++n) {
          mean_sum += cache->f[2 * (n * C + c)];
          var_sum += inst_var[n * C + c];
        }
        cache->d[kBatchMean + c] = mean_sum * inv_n;
        cache->d[kBatchMean + C + c] = var_sum * inv_n;
      }
      cache->has_pending_update = true;
    }
    return;
  }
  // Running statistics: y = (x - running_mean) * rstd * w + b, one multiply-add per element.
  cache->f.resize(C);
  const float* rm = running_mean_.data();
  const float* rv = running_var_.data();
  for (int64_t c = 0; c < C; ++c) {
    const double rstd = 1.0 / std::sqrt(double{rv[c]} + config_.eps);
    cache->f[c] = static_cast<float>(rstd);
  }
  for (int64_t n = 0; n < l.n; ++n) {
    for (int64_t c = 0; c < C; ++c) {
      const double rstd = cache->f[c];
      const double wc = w != nullptr ? w[c] : 1.0;
      const double bc = b != nullptr ? b[c] : 0.0;
      const float scale = static_cast<float>(rstd * wc);
      const float shift = static_cast<float>(bc - rm[c] * rstd * wc);
      const float* xc = x.data + (n * C + c) * l.s;
      float* yc = y->data() + (n * C + c) * l.s;
      for (int64_t i = 0; i < l.s; ++i) yc[i] = xc[i] * scale + shift;
    }
  }
}

void InstanceNorm::Backward(const ConstTensorView& x, const Tensor& /*y*/,
                            const ConstTensorView& dy, const LayerCache& cache,
                            const ForwardContext& ctx, Tensor* dx) {
  const GroupLayout l = Layout(x.rows());
  const int64_t C = config_.num_features;
  if (dx != nullptr) dx->Resize(x.shape);
  const bool grads = config_.affine && trainable();
  const float* w = config_.affine ? weight_.value.data() : nullptr;
  if (UsesInstanceStats(ctx)) {
    assert(static_cast<int64_t>(cache.f.size()) == 2 * l.blocks());
    GroupNormBackward(l, x.data, dy.data, w, cache.f.data(), grads ? weight_.grad.data() : nullptr,
                      grads ? bias_.grad.data() : nullptr, dx != nullptr ? dx->data() : nullptr);
    return;
  }
  // Running statistics are constants: dx = dy * w * rstd.
  assert(static_cast<int64_t>(cache.f.size()) == C);
  const float* rm = running_mean_.data();
  for (int64_t c = 0; c < C; ++c) {
    const double rstd = cache.f[c];
    const double wc = w != nullptr ? w[c] : 1.0;
    double sdy = 0.0, sdyx = 0.0;
    for (int64_t n = 0; n < l.n; ++n) {
      const float* xc = x.data + (n * C + c) * l.s;
      const float* dyc = dy.data + (n * C + c) * l.s;
      float* dxc = dx != nullptr ? dx->data() + (n * C + c) * l.s : nullptr;
      for (int64_t i = 0; i < l.s; ++i) {
        sdy += dyc[i];
        sdyx += dyc[i] * ((xc[i] - rm[c]) * rstd);
        if (dxc != nullptr) dxc[i] = static_cast<float>(dyc[i] * wc * rstd);
      }
    }
    if (grads) {
      weight_.grad.data()[c] += static_cast<float>(sdyx);
      bias_.grad.data()[c] += static_cast<float>(sdy);
    }
  }
}

void InstanceNorm::ApplyPendingUpdate(LayerCache* cache) {
  if (!cache->has_pending_update) return;
  cache->has_pending_update = false;
  const int64_t C = config_.num_features;
  const double m = config_.momentum;
  float* rm = running_mean_.data();
  float* rv = running_var_.data();
  for (int64_t c = 0; c < C; ++c) {
    rm[c] = static_cast<float>((1.0 - m) * rm[c] + m * cache->d[kBatchMean + c]);
    rv[c] = static_cast<float>((1.0 - m) * rv[c] + m * cache->d[kBatchMean + C + c]);
  }
}

void InstanceNorm::ResetRunningStats() {
  if (!config_.track_running_stats) return;
  running_mean_.Fill(0.0f);
  running_var_.Fill(1.0f);
  num_batches_tracked_ = 0;
}

}  // namespace normd
