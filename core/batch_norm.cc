#include "core/batch_norm.h"

#include <algorithm>
#include <cassert>
#include <cmath>
#include <cstring>

#if defined(__AVX512F__) || defined(__FMA__)
#include <immintrin.h>
#endif

#include "core/threads.h"

namespace normd {
namespace {

// Layout of LayerCache::d written by Forward:
//   [0] drift valid (0/1), [1] mean_shift, [2] var_log_ratio,
//   [3, 3+C) batch mean and [3+C, 3+2C) batch variance (biased; unbiased once an update is
//   pending), [3+2C, 3+3C) scratch for per-channel double math.
constexpr int kDriftValid = 0;
constexpr int kMeanShift = 1;
constexpr int kVarLogRatio = 2;
constexpr int kPending = 3;

// ---- Statistics kernels -------------------------------------------------------------------
//
// The per-channel reductions accumulate in double. GCC/Clang vector extensions let the compiler
// map a vector type onto what the target has (one AVX-512 register, two AVX registers, four
// SSE2 registers); only the float-to-double load is spelled out for AVX-512, where the generic
// conversion compiles to four instructions. The (N, C) kernels add each group of kRowGroup
// rows in float vectors of sixteen channels first (an eight-term float sum, as exact as the
// float inputs) and then into the double accumulators, which halves the vector work.
typedef float F8 __attribute__((vector_size(32)));
typedef float F16 __attribute__((vector_size(64)));
typedef double D8 __attribute__((vector_size(64)));
// These helpers are internal and inlined: GCC's note that returning a 64-byte vector without
// AVX-512 would change the ABI (portable builds) concerns no call that crosses a boundary.
#pragma GCC diagnostic ignored "-Wpsabi"

inline F16 LoadF16(const float* p) {
  F16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline F8 LoadF8AsFloat(const float* p) {
  F8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline D8 ToD8(F8 v) {
#if defined(__AVX512F__)
  return reinterpret_cast<D8>(_mm512_cvtps_pd(reinterpret_cast<__m256>(v)));
#else
  return __builtin_convertvector(v, D8);
#endif
}

inline D8 LoadF8(const float* p) { return ToD8(LoadF8AsFloat(p)); }

// ReLU's backward inside a fused BatchNorm + ReLU (BatchNorm::BackwardWithRelu): g where the
// pair's pre-ReLU value MulAdd(x, scale, shift) is positive, else 0: the forward's
// normalisation, and this file is compiled without floating-point contraction
// (core/CMakeLists.txt), so vector and scalar code round alike (a fused multiply-add only where
// MulAdd asks for one) and the mask is the forward's bit for bit.
typedef int32_t I8 __attribute__((vector_size(32)));
typedef int32_t I16 __attribute__((vector_size(64)));

// x * a + b with one rounding where the target has fused multiply-add (std::fma is then one
// instruction, and vectorises), with two elsewhere; the same in vector and scalar code.
inline float MulAdd(float x, float a, float b) {
#if defined(__FMA__)
  return std::fma(x, a, b);
#else
  return x * a + b;
#endif
}

// MulAdd on every lane: one vector fused multiply-add where the target has it (GCC does not
// turn the lane loop below back into one), the lane loop elsewhere.
template <typename V>
inline V MulAddLanes(V x, V a, V b) {
#if defined(__AVX512F__)
  if constexpr (sizeof(V) == 64) {
    return reinterpret_cast<V>(_mm512_fmadd_ps(reinterpret_cast<__m512>(x),
                                               reinterpret_cast<__m512>(a),
                                               reinterpret_cast<__m512>(b)));
  }
#endif
#if defined(__FMA__)
  if constexpr (sizeof(V) == 32) {
    return reinterpret_cast<V>(_mm256_fmadd_ps(reinterpret_cast<__m256>(x),
                                               reinterpret_cast<__m256>(a),
                                               reinterpret_cast<__m256>(b)));
  }
#endif
  V r;
  for (size_t j = 0; j < sizeof(V) / sizeof(float); ++j) r[j] = MulAdd(x[j], a[j], b[j]);
  return r;
}

inline F8 ReluMasked(F8 x, F8 g, F8 scale, F8 shift) {
  return (F8)((I8)g & (MulAddLanes(x, scale, shift) > F8{}));
}

inline F16 ReluMasked(F16 x, F16 g, F16 scale, F16 shift) {
  return (F16)((I16)g & (MulAddLanes(x, scale, shift) > F16{}));
}

inline float ReluMasked(float x, float g, float scale, float shift) {
  return MulAdd(x, scale, shift) > 0.0f ? g : 0.0f;
}

inline D8 LoadD8(const double* p) {
  D8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void StoreD8(double* p, D8 v) { std::memcpy(p, &v, sizeof v); }

inline D8 SplatD8(double v) { return D8{} + v; }

inline F8 SplatF8(float v) {
  F8 r;
  for (int j = 0; j < 8; ++j) r[j] = v;
  return r;
}

inline double Sum(D8 v) {
  double t = 0.0;
  for (int j = 0; j < 8; ++j) t += v[j];
  return t;
}

// Rows of x processed together by the (N, C) kernels: each pass over a block of channels
// reads kRowGroup rows, so the accumulators stay in registers while the memory accesses form
// kRowGroup sequential streams (walking one column of blocks down all rows instead strides
// by a whole row per access, which defeats the prefetchers).
constexpr int64_t kRowGroup = 8;
// Channels per register block: two float vectors of sixteen.
constexpr int64_t kBlock = 32;
// Channels per pass of the elementwise (N, C) loops (normalisation, input gradient): their
// per-channel coefficients (two or four floats a channel) then stay in L1 for all N rows.
constexpr int64_t kCoefBlock = 1024;

// For x viewed as (n, C, s) with samples `ld` floats apart (C * s for a whole tensor, more for
// a block of its channels), adds to acc1[c] and acc2[c] the sums over every value v of
// channel c of u and u * w, where u = A(v) and w = B(v) are what the Op makes of x (and of a
// second tensor g with x's layout, for the backward pass; read only when Op::kUsesG). Op
// gives, per channel, a constant (the shift or the mean) and the two terms from a loaded x
// and g vector. Each channel's sums are added in the same order whatever C and ld are, so a
// reduction over a block of channels gives those channels' results bit for bit.
// With kReluMask, g is first masked by ReLU's backward (ReluMasked) with the per-channel scale
// and shift of a fused BatchNorm + ReLU; otherwise those two are not read.
template <typename Op, bool kReluMask = false>
void ChannelReduce(const Op& op, const float* x, const float* g, int64_t n, int64_t C,
                   int64_t s, int64_t ld, const float* k, double* acc1, double* acc2,
                   const float* mask_scale = nullptr, const float* mask_shift = nullptr) {
  static_assert(Op::kUsesG || !kReluMask, "the ReLU mask applies to g");
  auto load_g = [x, g](int64_t o, F8 sc, F8 sh) {
    if constexpr (kReluMask) {
      return ToD8(ReluMasked(LoadF8AsFloat(x + o), LoadF8AsFloat(g + o), sc, sh));
    } else {
      return Op::kUsesG ? LoadF8(g + o) : D8{};
    }
  };
  auto load_g16 = [x, g](int64_t o, F16 sc, F16 sh) {
    if constexpr (kReluMask) {
      return ReluMasked(LoadF16(x + o), LoadF16(g + o), sc, sh);
    } else {
      return Op::kUsesG ? LoadF16(g + o) : F16{};
    }
  };
  auto scalar_g = [x, g](int64_t o, float sc, float sh) {
    if constexpr (kReluMask) {
      return ReluMasked(x[o], g[o], sc, sh);
    } else {
      return Op::kUsesG ? g[o] : 0.0f;
    }
  };
  auto coef8 = [](const float* p, int64_t c) { return kReluMask ? LoadF8AsFloat(p + c) : F8{}; };
  auto coef16 = [](const float* p, int64_t c) { return kReluMask ? LoadF16(p + c) : F16{}; };
  auto coef1 = [](const float* p, int64_t c) { return kReluMask ? p[c] : 0.0f; };
  if (s == 1) {
    for (int64_t i0 = 0; i0 < n; i0 += kRowGroup) {
      const int64_t i1 = std::min(n, i0 + kRowGroup);
      int64_t c0 = 0;
      for (; c0 + kBlock <= C; c0 += kBlock) {
        F16 a1[2] = {}, a2[2] = {}, kk[2], sc[2], sh[2];
        for (int v = 0; v < 2; ++v) {
          kk[v] = LoadF16(k + c0 + 16 * v);
          sc[v] = coef16(mask_scale, c0 + 16 * v);
          sh[v] = coef16(mask_shift, c0 + 16 * v);
        }
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t off = i * ld + c0;
          for (int v = 0; v < 2; ++v) {
            const int64_t o = off + 16 * v;
            op.Vector(LoadF16(x + o), load_g16(o, sc[v], sh[v]), kk[v], &a1[v], &a2[v]);
          }
        }
        float p1[kBlock], p2[kBlock];
        std::memcpy(p1, a1, sizeof p1);
        std::memcpy(p2, a2, sizeof p2);
        for (int v = 0; v < kBlock / 8; ++v) {
          StoreD8(acc1 + c0 + 8 * v, LoadD8(acc1 + c0 + 8 * v) + LoadF8(p1 + 8 * v));
          StoreD8(acc2 + c0 + 8 * v, LoadD8(acc2 + c0 + 8 * v) + LoadF8(p2 + 8 * v));
        }
      }
      for (; c0 + 8 <= C; c0 += 8) {
        D8 a1 = {}, a2 = {};
        const D8 kk = LoadF8(k + c0);
        const F8 sc = coef8(mask_scale, c0), sh = coef8(mask_shift, c0);
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t o = i * ld + c0;
          op.Vector(LoadF8(x + o), load_g(o, sc, sh), kk, &a1, &a2);
        }
        StoreD8(acc1 + c0, LoadD8(acc1 + c0) + a1);
        StoreD8(acc2 + c0, LoadD8(acc2 + c0) + a2);
      }
      for (; c0 < C; ++c0) {
        const float sc = coef1(mask_scale, c0), sh = coef1(mask_shift, c0);
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t o = i * ld + c0;
          op.Scalar(x[o], scalar_g(o, sc, sh), k[c0], &acc1[c0], &acc2[c0]);
        }
      }
    }
    return;
  }
  // (n, C, s): each (sample, channel) plane is s contiguous values.
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t c = 0; c < C; ++c) {
      const int64_t off = i * ld + c * s;
      const D8 kk = SplatD8(k[c]);
      const float sc1 = coef1(mask_scale, c), sh1 = coef1(mask_shift, c);
      const F8 sc = SplatF8(sc1), sh = SplatF8(sh1);
      D8 a1[2] = {}, a2[2] = {};
      int64_t j = 0;
      for (; j + 16 <= s; j += 16) {
        for (int v = 0; v < 2; ++v) {
          const int64_t o = off + j + 8 * v;
          op.Vector(LoadF8(x + o), load_g(o, sc, sh), kk, &a1[v], &a2[v]);
        }
      }
      for (; j + 8 <= s; j += 8) {
        op.Vector(LoadF8(x + off + j), load_g(off + j, sc, sh), kk, &a1[0], &a2[0]);
      }
      double t1 = Sum(a1[0] + a1[1]), t2 = Sum(a2[0] + a2[1]);
      for (; j < s; ++j) op.Scalar(x[off + j], scalar_g(off + j, sc1, sh1), k[c], &t1, &t2);
      acc1[c] += t1;
      acc2[c] += t2;
    }
  }
}

// Forward statistics: u = x - K_c, accumulating u and u^2 (shifted sums; with K_c a value of
// the channel the two sums cancel little, unlike plain sums of x and x^2).
struct ShiftedSumsOp {
  static constexpr bool kUsesG = false;
  template <typename V>
  void Vector(V x, V /*g*/, V k, V* a1, V* a2) const {
    const V u = x - k;
    *a1 += u;
    *a2 += u * u;
  }
  void Scalar(float x, float /*g*/, double k, double* a1, double* a2) const {
    const double u = x - k;
    *a1 += u;
    *a2 += u * u;
  }
};

// Backward sums: sum(dy) and sum(dy * (x - mean)).
struct GradSumsOp {
  static constexpr bool kUsesG = true;
  template <typename V>
  void Vector(V x, V g, V mean, V* a1, V* a2) const {
    *a1 += g;
    *a2 += g * (x - mean);
  }
  void Scalar(float x, float g, double mean, double* a1, double* a2) const {
    *a1 += g;
    *a2 += double{g} * (x - mean);
  }
};

// Per-channel mean and M2 of x viewed as (n, C, s) with samples ld floats apart, one pass:
// with K_c = x[0, c, 0], mean = K + S1 / count and M2 = S2 - S1^2 / count for the shifted
// sums S1, S2. `shift` receives K (C floats).
void MeanAndM2(const float* x, int64_t n, int64_t C, int64_t s, int64_t ld, double* mean,
               double* m2, float* shift) {
  for (int64_t c = 0; c < C; ++c) {
    shift[c] = x[c * s];
    mean[c] = m2[c] = 0.0;
  }
  ChannelReduce(ShiftedSumsOp(), x, nullptr, n, C, s, ld, shift, mean, m2);
  const double count = static_cast<double>(n * s);
  for (int64_t c = 0; c < C; ++c) {
    const double s1 = mean[c];
    mean[c] = shift[c] + s1 / count;
    m2[c] = std::max(0.0, m2[c] - s1 * s1 / count);
  }
}

// Chan et al.'s pairwise update: merges a group of nb values per channel (mean_b, m2_b) into
// the moments (*n, mean, m2) of another. Either group may be empty.
void MergeMoments(int64_t nb, const double* mean_b, const double* m2_b, int64_t channels,
                  int64_t* n, double* mean, double* m2) {
  if (nb == 0) return;
  if (*n == 0) {
    std::copy(mean_b, mean_b + channels, mean);
    std::copy(m2_b, m2_b + channels, m2);
    *n = nb;
    return;
  }
  const double na_d = static_cast<double>(*n);
  const double nb_d = static_cast<double>(nb);
  const double total = na_d + nb_d;
  for (int64_t c = 0; c < channels; ++c) {
    const double delta = mean_b[c] - mean[c];
    mean[c] += delta * nb_d / total;
    m2[c] += m2_b[c] + delta * delta * na_d * nb_d / total;
  }
  *n += nb;
}

// SyncBatchNorm's statistics: every rank's per-channel (count, mean, M2) gathered and merged in
// rank order (Chan et al.'s pairwise update, as CombineMoments), so every rank holds the same
// bits: the moments of the whole batch. mean and m2 hold this rank's on entry and the whole
// batch's on return; returns the whole batch's count of values per channel.
int64_t CombineAcrossRanks(const DataParallelShard& shard, int64_t local_count, double* mean,
                           double* m2, int64_t channels) {
  const int world = shard.collective->size();
  const int64_t stride = 1 + 2 * channels;
  thread_local std::vector<double> mine, all;
  mine.resize(stride);
  all.resize(stride * world);
  mine[0] = static_cast<double>(local_count);
  std::copy(mean, mean + channels, mine.begin() + 1);
  std::copy(m2, m2 + channels, mine.begin() + 1 + channels);
  shard.collective->AllGather(mine.data(), stride, all.data());
  int64_t n = 0;
  for (int r = 0; r < world; ++r) {
    const double* theirs = all.data() + r * stride;
    MergeMoments(static_cast<int64_t>(theirs[0]), theirs + 1, theirs + 1 + channels, channels,
                 &n, mean, m2);
  }
  return n;
}

// y = x * scale + shift for channels [c0, c1) of x viewed as (N, C, S), then ReLU
// (v > 0 ? v : 0, the ReLU layer's) when kRelu: the normalisation, fused with the ReLU that
// follows it or not. One MulAdd per element, which ReluMasked repeats.
template <bool kRelu>
void AffineChannels(const float* x, float* y, int64_t N, int64_t C, int64_t S,
                    const float* scale, const float* shift, int64_t c0, int64_t c1) {
  auto out = [](float v) { return kRelu ? (v > 0.0f ? v : 0.0f) : v; };
  if (S == 1) {
    for (int64_t b0 = c0; b0 < c1; b0 += kCoefBlock) {
      const int64_t b1 = std::min(c1, b0 + kCoefBlock);
      for (int64_t i = 0; i < N; ++i) {
        const float* xr = x + i * C;
        float* yr = y + i * C;
        for (int64_t c = b0; c < b1; ++c) yr[c] = out(MulAdd(xr[c], scale[c], shift[c]));
      }
    }
    return;
  }
  for (int64_t i = 0; i < N; ++i) {
    for (int64_t c = c0; c < c1; ++c) {
      const float* xr = x + (i * C + c) * S;
      float* yr = y + (i * C + c) * S;
      const float a = scale[c], b = shift[c];
      for (int64_t k = 0; k < S; ++k) yr[k] = out(MulAdd(xr[k], a, b));
    }
  }
}

// The backward's second pass for channels [c0, c1) of (N, C, S):
//   dx = k * dy + a * (x - mean) + b per channel,
// with dy first masked by ReLU's backward (ReluMasked with scale and shift) when kRelu.
template <bool kRelu>
void InputGradientChannels(const float* x, const float* dy, float* dx, int64_t N, int64_t C,
                           int64_t S, const float* mean, const float* k, const float* a,
                           const float* b, const float* scale, const float* shift, int64_t c0,
                           int64_t c1) {
  if (S == 1) {
    for (int64_t b0 = c0; b0 < c1; b0 += kCoefBlock) {
      const int64_t b1 = std::min(c1, b0 + kCoefBlock);
      for (int64_t i = 0; i < N; ++i) {
        const float* xr = x + i * C;
        const float* gr = dy + i * C;
        float* dr = dx + i * C;
        for (int64_t c = b0; c < b1; ++c) {
          const float g = kRelu ? ReluMasked(xr[c], gr[c], scale[c], shift[c]) : gr[c];
          dr[c] = k[c] * g + a[c] * (xr[c] - mean[c]) + b[c];
        }
      }
    }
    return;
  }
  for (int64_t i = 0; i < N; ++i) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t off = (i * C + c) * S;
      const float kc = k[c], ac = a[c], bc = b[c], mc = mean[c];
      const float sc = kRelu ? scale[c] : 0.0f, sh = kRelu ? shift[c] : 0.0f;
      for (int64_t j = 0; j < S; ++j) {
        const float g = kRelu ? ReluMasked(x[off + j], dy[off + j], sc, sh) : dy[off + j];
        dx[off + j] = kc * g + ac * (x[off + j] - mc) + bc;
      }
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
  std::vector<float> shift(channels);
  MeanAndM2(x, n, channels, s, channels * s, out->mean.data(), out->m2.data(), shift.data());
}

void CombineMoments(ChannelMoments* a, const ChannelMoments& b) {
  assert(a->mean.size() == b.mean.size());
  MergeMoments(b.count, b.mean.data(), b.m2.data(), static_cast<int64_t>(a->mean.size()),
               &a->count, a->mean.data(), a->m2.data());
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
  // Data-parallel: the rule is about the whole batch the statistics come from.
  const int64_t rows = ctx.shard.active() ? ctx.shard.global_rows : batch_in[0];
  if (UsesBatchStats(ctx) && SaturatingMul(rows, spatial_) == 1) {
    return InvalidArgument("Expected more than 1 value per channel when training, got input size ",
                           batch_in.DropFirst().WithBatch(rows).ToString());
  }
  return Status::Ok();
}

void BatchNorm::Forward(const ConstTensorView& x, Tensor* y, LayerCache* cache,
                        const ForwardContext& ctx) const {
  ForwardPass(x, y, cache, ctx, /*relu=*/false);
}

void BatchNorm::ForwardWithRelu(const ConstTensorView& x, Tensor* y, LayerCache* cache,
                                const ForwardContext& ctx) const {
  ForwardPass(x, y, cache, ctx, /*relu=*/true);
}

void BatchNorm::RecomputeOutput(const ConstTensorView& x, const LayerCache& cache,
                                Tensor* y) const {
  const int64_t C = config_.num_features;
  y->Resize(x.shape);
  AffineChannels<false>(x.data, y->data(), x.rows(), C, spatial_, cache.f.data() + 2 * C,
                        cache.f.data() + 3 * C, 0, C);
}

void BatchNorm::ForwardPass(const ConstTensorView& x, Tensor* y, LayerCache* cache,
                            const ForwardContext& ctx, bool relu) const {
  const int64_t C = config_.num_features;
  const int64_t S = spatial_;
  const int64_t N = x.rows();
  const bool batch_stats = UsesBatchStats(ctx);
  const bool track = config_.track_running_stats;
  const double eps = config_.eps;
  using ArrayD = Eigen::Map<Eigen::ArrayXd>;
  using ArrayF = Eigen::Map<Eigen::ArrayXf>;
  using ConstArrayF = Eigen::Map<const Eigen::ArrayXf>;

  // f: [0, C) mean used, [C, 2C) 1/sqrt(var + eps) used, [2C, 3C) scale, [3C, 4C) shift.
  cache->f.resize(4 * C);
  cache->d.resize(kPending + 3 * C);
  cache->has_pending_update = false;
  double* d = cache->d.data();
  ArrayD batch_mean(d + kPending, C);
  ArrayD batch_var(d + kPending + C, C);
  ArrayF mean_used(cache->f.data(), C);
  ArrayF invstd_used(cache->f.data() + C, C);
  ArrayF scale(cache->f.data() + 2 * C, C);
  ArrayF shift(cache->f.data() + 3 * C, C);

  const bool need_stats = batch_stats || track;
  // Data-parallel (SyncBatchNorm): the statistics are the whole batch's, combined from every
  // rank's shard before anything is normalised. With running statistics normalising (eval
  // mode, a frozen layer) they are combined all the same, for the drift figures: the drift
  // describes the whole batch, as one process's does.
  const bool sync = ctx.shard.active() && need_stats;
  double count = static_cast<double>(N * S);
  // 1/sqrt(var + eps) in double (Eigen vectorises it when no cast is inside the expression),
  // in the scratch area, then rounded to float.
  ArrayD invstd(d + kPending + 2 * C, C);
  const float* xp = x.data;
  y->Resize(x.shape);
  float* yp = y->data();

  // One pass over channels [c0, c1) of x: batch mean and biased variance (needed for the drift
  // in eval mode too). The scale area of f is free until the normalisation and holds the
  // shifts meanwhile. An empty shard contributes nothing (count 0).
  auto statistics = [&](int64_t c0, int64_t c1) {
    if (N == 0) {
      batch_mean.segment(c0, c1 - c0) = 0.0;
      batch_var.segment(c0, c1 - c0) = 0.0;
      return;
    }
    MeanAndM2(xp + c0 * S, N, c1 - c0, S, C * S, batch_mean.data() + c0, batch_var.data() + c0,
              scale.data() + c0);
    if (!sync) batch_var.segment(c0, c1 - c0) /= count;  // sync: M2 until combined
  };
  // y = x * scale + shift per channel [c0, c1): one multiply-add per element.
  auto normalise = [&](int64_t c0, int64_t c1) {
    const int64_t cw = c1 - c0;
    if (batch_stats) {
      invstd.segment(c0, cw) = (batch_var.segment(c0, cw) + eps).sqrt().inverse();
      for (int64_t c = c0; c < c1; ++c) mean_used[c] = static_cast<float>(batch_mean[c]);
    } else {
      const float* rv = running_var_.data();
      for (int64_t c = c0; c < c1; ++c) invstd[c] = double{rv[c]} + eps;
      invstd.segment(c0, cw) = invstd.segment(c0, cw).sqrt().inverse();
      mean_used.segment(c0, cw) = ConstArrayF(running_mean_.data(), C).segment(c0, cw);
    }
    for (int64_t c = c0; c < c1; ++c) invstd_used[c] = static_cast<float>(invstd[c]);

    if (config_.affine) {
      scale.segment(c0, cw) =
          ConstArrayF(weight_.value.data(), C).segment(c0, cw) * invstd_used.segment(c0, cw);
      shift.segment(c0, cw) = ConstArrayF(bias_.value.data(), C).segment(c0, cw) -
                              mean_used.segment(c0, cw) * scale.segment(c0, cw);
    } else {
      scale.segment(c0, cw) = invstd_used.segment(c0, cw);
      shift.segment(c0, cw) = -mean_used.segment(c0, cw) * scale.segment(c0, cw);
    }
    if (relu) {
      AffineChannels<true>(xp, yp, N, C, S, scale.data(), shift.data(), c0, c1);
    } else {
      AffineChannels<false>(xp, yp, N, C, S, scale.data(), shift.data(), c0, c1);
    }
  };

  // Channels are independent until the drift: a large layer splits them across two cores
  // (SplitInTwo). For (N, C) inputs the split is at a multiple of kBlock channels, so every
  // channel takes the same reduction path as unsplit, and the results are the same bits.
  const int64_t align = S == 1 ? kBlock : 1;
  const int64_t work = kSplitWorkPerElement * N * C * S;
  if (!sync) {
    SplitInTwo(C, align, work, [&](int64_t c0, int64_t c1) {
      if (need_stats) statistics(c0, c1);
      normalise(c0, c1);
    });
  } else {
    SplitInTwo(C, align, work, statistics);
    count = static_cast<double>(CombineAcrossRanks(ctx.shard, N * S, batch_mean.data(),
                                                   batch_var.data(), C));
    batch_var /= count;
    SplitInTwo(C, align, work, normalise);
  }

  // Drift against the running estimates, before any update. It reuses the scratch area, whose
  // 1/sqrt values have been rounded into invstd_used.
  d[kDriftValid] = track ? 1.0 : 0.0;
  d[kMeanShift] = d[kVarLogRatio] = 0.0;
  if (track) {
    // In double throughout so Eigen vectorises the logarithms (a float-to-double cast inside
    // the expression would make it scalar).
    ArrayD denom(d + kPending + 2 * C, C);
    const float* rm = running_mean_.data();
    const float* rv = running_var_.data();
    for (int64_t c = 0; c < C; ++c) denom[c] = double{rv[c]} + eps;
    d[kVarLogRatio] = ((batch_var + eps) / denom).log().abs().sum() / C;
    // |batch mean - running mean| / running std, in place and branch-free so the loop
    // vectorises (as a running sum with a scalar division per channel it cost 0.4 of the 4.2 us
    // of a (32, 512) forward).
    denom = denom.sqrt();
    for (int64_t c = 0; c < C; ++c) denom[c] = std::abs(batch_mean[c] - double{rm[c]}) / denom[c];
    d[kMeanShift] = denom.sum() / C;
  }

  if (batch_stats && ctx.training && ctx.update_running_stats && track) {
    // Pending update: the batch mean stays, the variance becomes the unbiased estimate.
    batch_var = batch_var * count / (count - 1);
    cache->has_pending_update = true;
  }
}

void BatchNorm::Backward(const ConstTensorView& x, const Tensor& /*y*/, const ConstTensorView& dy,
                         const LayerCache& cache, const ForwardContext& ctx, Tensor* dx) {
  BackwardPass(x, dy, cache, ctx, dx, /*relu=*/false);
}

void BatchNorm::BackwardWithRelu(const ConstTensorView& x, const Tensor& /*y*/,
                                 const ConstTensorView& dy, const LayerCache& cache,
                                 const ForwardContext& ctx, Tensor* dx) {
  BackwardPass(x, dy, cache, ctx, dx, /*relu=*/true);
}

void BatchNorm::BackwardPass(const ConstTensorView& x, const ConstTensorView& dy,
                             const LayerCache& cache, const ForwardContext& ctx, Tensor* dx,
                             bool relu) {
  const int64_t C = config_.num_features;
  const int64_t S = spatial_;
  const int64_t N = x.rows();
  const float* mean = cache.f.data();
  const float* invstd = cache.f.data() + C;
  const float* scale = cache.f.data() + 2 * C;  // the forward's, for the fused ReLU's mask
  const float* shift = cache.f.data() + 3 * C;
  const float* xp = x.data;
  const float* dyp = dy.data;

  // Pass 1: per channel, sum(dy) and sum(dy * (x - mean)), in double. `work` holds them and
  // keeps its capacity.
  thread_local std::vector<double> work;
  work.assign(2 * C, 0.0);
  double* sum_dy = work.data();
  double* sum_dy_xmu = work.data() + C;
  // Pass 2: dx. With batch statistics the gradient flows through mean and variance:
  //   dx = gamma * invstd * (dy - sum_dy / n - xhat * sum(dy * xhat) / n)
  // With running statistics they are constants: dx = dy * gamma * invstd.
  float* dxp = nullptr;
  if (dx != nullptr) {
    dx->Resize(x.shape);
    dxp = dx->data();
  }
  thread_local std::vector<float> coef;
  coef.resize(3 * C);
  float* k = coef.data();          // multiplies dy
  float* a = coef.data() + C;      // multiplies (x - mean)
  float* b = coef.data() + 2 * C;  // constant term
  const float* gamma = config_.affine ? weight_.value.data() : nullptr;
  const bool batch_stats = UsesBatchStats(ctx);
  // An untrainable layer's parameter gradients stay zero (Layer::trainable); without dx the
  // backward then has nothing to compute.
  const bool param_grads = config_.affine && trainable();
  if (!param_grads && dx == nullptr) return;
  // SyncBatchNorm: the input gradient needs the whole batch's sums. The parameter gradients
  // take this shard's, as every parameter gradient does (the model sums them over the ranks).
  const bool sync = ctx.shard.active() && batch_stats && dx != nullptr;
  const double n = static_cast<double>((sync ? ctx.shard.global_rows : N) * S);

  auto sums = [&](int64_t c0, int64_t c1) {
    if (relu) {
      ChannelReduce<GradSumsOp, true>(GradSumsOp(), xp + c0 * S, dyp + c0 * S, N, c1 - c0, S,
                                      C * S, mean + c0, sum_dy + c0, sum_dy_xmu + c0,
                                      scale + c0, shift + c0);
    } else {
      ChannelReduce(GradSumsOp(), xp + c0 * S, dyp + c0 * S, N, c1 - c0, S, C * S, mean + c0,
                    sum_dy + c0, sum_dy_xmu + c0);
    }
    if (param_grads) {
      float* gw = weight_.grad.data();
      float* gb = bias_.grad.data();
      for (int64_t c = c0; c < c1; ++c) {
        gw[c] += static_cast<float>(sum_dy_xmu[c] * invstd[c]);
        gb[c] += static_cast<float>(sum_dy[c]);
      }
    }
  };
  auto input_gradient = [&](int64_t c0, int64_t c1) {
    // Branch-free loops over channels so they vectorise.
    for (int64_t c = c0; c < c1; ++c) {
      k[c] = static_cast<float>((gamma != nullptr ? double{gamma[c]} : 1.0) * invstd[c]);
    }
    if (batch_stats) {
      // xhat * sum(dy*xhat) / n = (x - mean) * is^2 * sum_dy_xmu / n
      for (int64_t c = c0; c < c1; ++c) {
        const double gi = (gamma != nullptr ? double{gamma[c]} : 1.0) * invstd[c];
        const double is = invstd[c];
        a[c] = static_cast<float>(-gi * is * is * sum_dy_xmu[c] / n);
        b[c] = static_cast<float>(-gi * sum_dy[c] / n);
      }
    } else {
      std::fill(a + c0, a + c1, 0.0f);
      std::fill(b + c0, b + c1, 0.0f);
    }
    if (relu) {
      InputGradientChannels<true>(xp, dyp, dxp, N, C, S, mean, k, a, b, scale, shift, c0, c1);
    } else {
      InputGradientChannels<false>(xp, dyp, dxp, N, C, S, mean, k, a, b, scale, shift, c0, c1);
    }
  };

  // Channels are independent: a large layer splits them across two cores, as in Forward.
  const int64_t align = S == 1 ? kBlock : 1;
  const int64_t work_size = kSplitWorkPerElement * N * C * S;
  if (!sync) {
    SplitInTwo(C, align, work_size, [&](int64_t c0, int64_t c1) {
      sums(c0, c1);
      if (dx != nullptr) input_gradient(c0, c1);
    });
  } else {
    SplitInTwo(C, align, work_size, sums);
    ctx.shard.collective->AllReduceSum(work.data(), 2 * C);
    SplitInTwo(C, align, work_size, input_gradient);
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

ChannelMoments BatchNorm::BatchMomentsOf(const LayerCache& cache, int64_t rows) const {
  const int64_t C = config_.num_features;
  assert(!cache.has_pending_update && static_cast<int64_t>(cache.d.size()) >= kPending + 2 * C);
  ChannelMoments m;
  m.count = rows * spatial_;
  m.mean.assign(cache.d.begin() + kPending, cache.d.begin() + kPending + C);
  m.m2.resize(C);
  for (int64_t c = 0; c < C; ++c) m.m2[c] = cache.d[kPending + C + c] * m.count;  // biased var
  return m;
}

void BatchNorm::ReplaceRunningStats(const ChannelMoments& pooled, int64_t batches) {
  assert(config_.track_running_stats && pooled.count > 1);
  for (int64_t c = 0; c < config_.num_features; ++c) {
    running_mean_.data()[c] = static_cast<float>(pooled.mean[c]);
    running_var_.data()[c] = static_cast<float>(pooled.UnbiasedVar(c));
  }
  num_batches_tracked_ += batches;
}

void BatchNorm::ResetRunningStats() {
  if (!config_.track_running_stats) return;
  running_mean_.Fill(0.0f);
  running_var_.Fill(1.0f);
  num_batches_tracked_ = 0;
}

}  // namespace normd
