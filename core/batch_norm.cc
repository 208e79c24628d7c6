#include "core/batch_norm.h"

#include <cassert>
#include <cmath>

namespace normd {
namespace {

// Layout of LayerCache::d written by Forward:
//   [0] drift valid (0/1), [1] mean_shift, [2] var_log_ratio,
//   then, when an update is pending, [3, 3+C) batch mean and [3+C, 3+2C) unbiased variance.
constexpr int kDriftValid = 0;
constexpr int kMeanShift = 1;
constexpr int kVarLogRatio = 2;
constexpr int kPending = 3;

// Per-channel sums over x viewed as (n, channels, s), in double: sum and sum of squares.
// One pass; used for eval-mode drift where the statistics only feed a diagnostic.
void SumAndSquares(const float* x, int64_t n, int64_t channels, int64_t s, double* sum,
                   double* sumsq) {
  for (int64_t c = 0; c < channels; ++c) sum[c] = sumsq[c] = 0.0;
  if (s == 1) {
    for (int64_t i = 0; i < n; ++i) {
      const float* row = x + i * channels;
      for (int64_t c = 0; c < channels; ++c) {
        const double v = row[c];
        sum[c] += v;
        sumsq[c] += v * v;
      }
    }
    return;
  }
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t c = 0; c < channels; ++c) {
      Eigen::Map<const Eigen::VectorXf> plane(x + (i * channels + c) * s, s);
      sum[c] += plane.cast<double>().sum();
      sumsq[c] += plane.cast<double>().squaredNorm();
    }
  }
}

}  // namespace

void ComputeMoments(const float* x, int64_t n, int64_t channels, int64_t s,
                    ChannelMoments* out) {
  out->count = n * s;
  out->mean.assign(channels, 0.0);
  out->m2.assign(channels, 0.0);
  if (out->count == 0) return;
  double* mean = out->mean.data();
  double* m2 = out->m2.data();
  const double inv_count = 1.0 / static_cast<double>(out->count);
  if (s == 1) {
    // (N, C): accumulate whole rows, which vectorises across channels.
    for (int64_t i = 0; i < n; ++i) {
      const float* row = x + i * channels;
      for (int64_t c = 0; c < channels; ++c) mean[c] += row[c];
    }
    for (int64_t c = 0; c < channels; ++c) mean[c] *= inv_count;
    for (int64_t i = 0; i < n; ++i) {
      const float* row = x + i * channels;
      for (int64_t c = 0; c < channels; ++c) {
        const double d = row[c] - mean[c];
        m2[c] += d * d;
      }
    }
    return;
  }
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t c = 0; c < channels; ++c) {
      mean[c] += Eigen::Map<const Eigen::VectorXf>(x + (i * channels + c) * s, s)
                     .cast<double>()
                     .sum();
    }
  }
  for (int64_t c = 0; c < channels; ++c) mean[c] *= inv_count;
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t c = 0; c < channels; ++c) {
      Eigen::Map<const Eigen::VectorXf> plane(x + (i * channels + c) * s, s);
      m2[c] += (plane.cast<double>().array() - mean[c]).square().sum();
    }
  }
}

void CombineMoments(ChannelMoments* a, const ChannelMoments& b) {
  assert(a->mean.size() == b.mean.size());
  if (b.count == 0) return;
  if (a->count == 0) {
    *a = b;
    return;
  }
  const double na = static_cast<double>(a->count);
  const double nb = static_cast<double>(b.count);
  const double n = na + nb;
  for (size_t c = 0; c < a->mean.size(); ++c) {
    const double delta = b.mean[c] - a->mean[c];
    a->mean[c] += delta * nb / n;
    a->m2[c] += b.m2[c] + delta * delta * na * nb / n;
  }
  a->count += b.count;
}

BatchNorm::BatchNorm(const BatchNormConfig& config, bool two_d)
    : config_(config), two_d_(two_d) {}

Status BatchNorm::Build(const Shape& in, Shape* out) {
  const BatchNormConfig& c = config_;
  if (c.num_features <= 0) {
    return InvalidArgument("num_features must be positive, got ", c.num_features);
  }
  if (!(c.eps > 0.0f) || !std::isfinite(c.eps)) {
    return InvalidArgument("eps must be > 0, got ", c.eps);
  }
  if (!c.cumulative_average && !(c.momentum >= 0.0f && c.momentum <= 1.0f)) {
    return InvalidArgument("momentum must be in [0, 1], got ", c.momentum);
  }
  if (two_d_ && in.rank() != 3) {
    return InvalidArgument("expects a 3-D per-sample input (C, H, W), got ", in.ToString());
  }
  if (!two_d_ && in.rank() != 1 && in.rank() != 2) {
    return InvalidArgument("expects a per-sample input (C) or (C, L), got ", in.ToString());
  }
  if (in[0] != c.num_features) {
    return InvalidArgument("num_features is ", c.num_features, " but the previous layer produces ",
                           in[0], in.rank() == 1 ? " features" : " channels");
  }
  spatial_ = in.DropFirst().NumElements();
  *out = in;
  return Status::Ok();
}

int64_t BatchNorm::NumParameters() const { return config_.affine ? 2 * config_.num_features : 0; }

void BatchNorm::Allocate(Rng& /*rng*/) {
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

Status BatchNorm::CheckBatch(const Shape& batch_in, const ForwardContext& ctx) const {
  // PyTorch applies the rule whenever batch statistics normalise (bn_training), which
  // includes eval mode without running statistics.
  if (UsesBatchStats(ctx) && SaturatingMul(batch_in[0], spatial_) == 1) {
    return InvalidArgument("Expected more than 1 value per channel when training, got input size ",
                           batch_in.ToString());
  }
  return Status::Ok();
}

void BatchNorm::Forward(const ConstTensorView& x, Tensor* y, LayerCache* cache,
                        const ForwardContext& ctx) const {
  const int64_t C = config_.num_features;
  const int64_t S = spatial_;
  const int64_t N = x.rows();
  const bool batch_stats = UsesBatchStats(ctx);
  const bool track = config_.track_running_stats;
  const double eps = config_.eps;

  // f: [0, C) mean used, [C, 2C) 1/sqrt(var + eps) used, [2C, 3C) scale, [3C, 4C) shift.
  cache->f.resize(4 * C);
  cache->d.resize(kPending + 2 * C);
  cache->has_pending_update = false;
  float* mean_used = cache->f.data();
  float* invstd_used = cache->f.data() + C;
  double* d = cache->d.data();
  // Batch mean and biased variance, kept in d's pending area while we need them.
  double* batch_mean = d + kPending;
  double* batch_var = d + kPending + C;

  if (batch_stats) {
    ChannelMoments m;
    ComputeMoments(x.data, N, C, S, &m);
    for (int64_t c = 0; c < C; ++c) {
      batch_mean[c] = m.mean[c];
      batch_var[c] = m.BiasedVar(c);
    }
  } else if (track) {
    SumAndSquares(x.data, N, C, S, batch_mean, batch_var);
    const double inv = 1.0 / static_cast<double>(N * S);
    for (int64_t c = 0; c < C; ++c) {
      batch_mean[c] *= inv;
      batch_var[c] = std::max(0.0, batch_var[c] * inv - batch_mean[c] * batch_mean[c]);
    }
  }

  // Drift against the running estimates, before any update.
  d[kDriftValid] = track ? 1.0 : 0.0;
  d[kMeanShift] = d[kVarLogRatio] = 0.0;
  if (track) {
    const float* rm = running_mean_.data();
    const float* rv = running_var_.data();
    double shift = 0.0, log_ratio = 0.0;
    for (int64_t c = 0; c < C; ++c) {
      const double denom = rv[c] + eps;
      shift += std::abs(batch_mean[c] - rm[c]) / std::sqrt(denom);
      log_ratio += std::abs(std::log((batch_var[c] + eps) / denom));
    }
    d[kMeanShift] = shift / C;
    d[kVarLogRatio] = log_ratio / C;
  }

  for (int64_t c = 0; c < C; ++c) {
    if (batch_stats) {
      mean_used[c] = static_cast<float>(batch_mean[c]);
      invstd_used[c] = static_cast<float>(1.0 / std::sqrt(batch_var[c] + eps));
    } else {
      mean_used[c] = running_mean_.data()[c];
      invstd_used[c] = static_cast<float>(1.0 / std::sqrt(double{running_var_.data()[c]} + eps));
    }
  }

  if (ctx.training && ctx.update_running_stats && track) {
    // Pending update: the batch mean stays, the variance becomes the unbiased estimate.
    const int64_t n = N * S;
    for (int64_t c = 0; c < C; ++c) batch_var[c] = batch_var[c] * n / (n - 1);
    cache->has_pending_update = true;
  }

  // y = x * scale + shift per channel: one multiply-add per element.
  y->Resize(x.shape);
  float* scale = cache->f.data() + 2 * C;
  float* shift = cache->f.data() + 3 * C;
  for (int64_t c = 0; c < C; ++c) {
    const float g = config_.affine ? weight_.value.data()[c] : 1.0f;
    const float b = config_.affine ? bias_.value.data()[c] : 0.0f;
    scale[c] = g * invstd_used[c];
    shift[c] = b - mean_used[c] * scale[c];
  }
  const float* xp = x.data;
  float* yp = y->data();
  if (S == 1) {
    for (int64_t i = 0; i < N; ++i) {
      const float* xr = xp + i * C;
      float* yr = yp + i * C;
      for (int64_t c = 0; c < C; ++c) yr[c] = xr[c] * scale[c] + shift[c];
    }
  } else {
    for (int64_t i = 0; i < N; ++i) {
      for (int64_t c = 0; c < C; ++c) {
        const float* xr = xp + (i * C + c) * S;
        float* yr = yp + (i * C + c) * S;
        const float a = scale[c], b = shift[c];
        for (int64_t k = 0; k < S; ++k) yr[k] = xr[k] * a + b;
      }
    }
  }
}

void BatchNorm::Backward(const ConstTensorView& x, const Tensor& /*y*/, const ConstTensorView& dy,
                         const LayerCache& cache, const ForwardContext& ctx, Tensor* dx) {
  const int64_t C = config_.num_features;
  const int64_t S = spatial_;
  const int64_t N = x.rows();
  const float* mean = cache.f.data();
  const float* invstd = cache.f.data() + C;
  const float* xp = x.data;
  const float* dyp = dy.data;

  // Pass 1: per channel, sum(dy) and sum(dy * (x - mean)).
  thread_local std::vector<double> sums;
  sums.assign(2 * C, 0.0);
  double* sum_dy = sums.data();
  double* sum_dy_xmu = sums.data() + C;
  if (S == 1) {
    for (int64_t i = 0; i < N; ++i) {
      const float* xr = xp + i * C;
      const float* gr = dyp + i * C;
      for (int64_t c = 0; c < C; ++c) {
        sum_dy[c] += gr[c];
        sum_dy_xmu[c] += static_cast<double>(gr[c]) * (xr[c] - mean[c]);
      }
    }
  } else {
    for (int64_t i = 0; i < N; ++i) {
      for (int64_t c = 0; c < C; ++c) {
        Eigen::Map<const Eigen::VectorXf> xr(xp + (i * C + c) * S, S);
        Eigen::Map<const Eigen::VectorXf> gr(dyp + (i * C + c) * S, S);
        sum_dy[c] += gr.cast<double>().sum();
        sum_dy_xmu[c] +=
            (gr.cast<double>().array() * (xr.cast<double>().array() - double{mean[c]})).sum();
      }
    }
  }
  if (config_.affine) {
    float* gw = weight_.grad.data();
    float* gb = bias_.grad.data();
    for (int64_t c = 0; c < C; ++c) {
      gw[c] += static_cast<float>(sum_dy_xmu[c] * invstd[c]);
      gb[c] += static_cast<float>(sum_dy[c]);
    }
  }
  if (dx == nullptr) return;

  // Pass 2: dx. With batch statistics the gradient flows through mean and variance:
  //   dx = gamma * invstd * (dy - sum_dy / n - xhat * sum(dy * xhat) / n)
  // With running statistics they are constants: dx = dy * gamma * invstd.
  dx->Resize(x.shape);
  float* dxp = dx->data();
  thread_local std::vector<float> coef;
  coef.resize(3 * C);
  float* k = coef.data();           // multiplies dy
  float* a = coef.data() + C;       // multiplies (x - mean)
  float* b = coef.data() + 2 * C;   // constant term
  const bool batch_stats = UsesBatchStats(ctx);
  const double n = static_cast<double>(N * S);
  for (int64_t c = 0; c < C; ++c) {
    const double g = config_.affine ? weight_.value.data()[c] : 1.0;
    const double is = invstd[c];
    k[c] = static_cast<float>(g * is);
    if (batch_stats) {
      // xhat * sum(dy*xhat) / n = (x - mean) * is^2 * sum_dy_xmu / n
      a[c] = static_cast<float>(-g * is * is * is * sum_dy_xmu[c] / n);
      b[c] = static_cast<float>(-g * is * sum_dy[c] / n);
    } else {
      a[c] = 0.0f;
      b[c] = 0.0f;
    }
  }
  if (S == 1) {
    for (int64_t i = 0; i < N; ++i) {
      const float* xr = xp + i * C;
      const float* gr = dyp + i * C;
      float* dr = dxp + i * C;
      for (int64_t c = 0; c < C; ++c) dr[c] = k[c] * gr[c] + a[c] * (xr[c] - mean[c]) + b[c];
    }
  } else {
    for (int64_t i = 0; i < N; ++i) {
      for (int64_t c = 0; c < C; ++c) {
        const int64_t off = (i * C + c) * S;
        const float kc = k[c], ac = a[c], bc = b[c], mc = mean[c];
        for (int64_t j = 0; j < S; ++j) {
          dxp[off + j] = kc * dyp[off + j] + ac * (xp[off + j] - mc) + bc;
        }
      }
    }
  }
}

std::vector<Parameter*> BatchNorm::parameters() {
  if (!config_.affine) return {};
  return {&weight_, &bias_};
}

std::vector<StateSlot> BatchNorm::state() {
  std::vector<StateSlot> slots = Layer::state();
  if (config_.track_running_stats) {
    slots.push_back(StateSlot{"running_mean", &running_mean_, nullptr});
    slots.push_back(StateSlot{"running_var", &running_var_, nullptr});
    slots.push_back(StateSlot{"num_batches_tracked", nullptr, &num_batches_tracked_});
  }
  return slots;
}

BatchNormUpdate BatchNorm::Commit(LayerCache* cache) {
  BatchNormUpdate u;
  if (!cache->has_pending_update) return u;
  cache->has_pending_update = false;
  const int64_t C = config_.num_features;
  const double* batch_mean = cache->d.data() + kPending;
  const double* batch_var = cache->d.data() + kPending + C;
  ++num_batches_tracked_;
  const double m = config_.cumulative_average ? 1.0 / static_cast<double>(num_batches_tracked_)
                                              : static_cast<double>(config_.momentum);
  float* rm = running_mean_.data();
  float* rv = running_var_.data();
  double dm2 = 0.0, dv2 = 0.0;
  for (int64_t c = 0; c < C; ++c) {
    const float new_m = static_cast<float>(m * batch_mean[c] + (1.0 - m) * rm[c]);
    const float new_v = static_cast<float>(m * batch_var[c] + (1.0 - m) * rv[c]);
    dm2 += (double{new_m} - rm[c]) * (double{new_m} - rm[c]);
    dv2 += (double{new_v} - rv[c]) * (double{new_v} - rv[c]);
    rm[c] = new_m;
    rv[c] = new_v;
  }
  u.running_mean_update_norm = std::sqrt(dm2);
  u.running_var_update_norm = std::sqrt(dv2);
  return u;
}

BatchNormDrift BatchNorm::DriftOf(const LayerCache& cache) {
  BatchNormDrift drift;
  if (cache.d.size() <= kVarLogRatio || cache.d[kDriftValid] == 0.0) return drift;
  drift.valid = true;
  drift.mean_shift = cache.d[kMeanShift];
  drift.var_log_ratio = cache.d[kVarLogRatio];
  return drift;
}

void BatchNorm::ResetRunningStats() {
  if (!config_.track_running_stats) return;
  running_mean_.Fill(0.0f);
  running_var_.Fill(1.0f);
  num_batches_tracked_ = 0;
}

}  // namespace normd
