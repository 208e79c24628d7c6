#include "core/conv2d_direct.h"

#include <algorithm>
#include <cstring>

#include "core/threads.h"

namespace normd {
namespace {

// The widest vectors the build targets, and whether it has 32 vector registers (AVX-512) or 16.
#if defined(__AVX512F__)
constexpr int kLanes = 16;
constexpr bool kManyRegisters = true;
#elif defined(__AVX__)
constexpr int kLanes = 8;
constexpr bool kManyRegisters = false;
#else
constexpr int kLanes = 4;
constexpr bool kManyRegisters = false;
#endif

using Vec = float __attribute__((vector_size(kLanes * sizeof(float))));

// A vector read from or written to any float address (memcpy: no alignment or aliasing
// assumption; compilers emit one unaligned vector move).
inline Vec Load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void Store(float* p, Vec v) { std::memcpy(p, &v, sizeof v); }

// Register tiles of the forward kernels: kWide positions x 2 vectors of output channels when
// the padded channel count is an even number of vectors, else kNarrow positions x 1 vector.
// Sized so accumulators plus the weight vectors of one kernel row fit the register file.
constexpr int kWide = kManyRegisters ? 8 : 4;
constexpr int kNarrow = kManyRegisters ? 16 : 8;
// Winograd is used for stride-1 3x3 passes that sum at least this many channels into at least
// this many: the transforms cost in proportion to the channels, the products they save in
// proportion to their product. Measured on issue 13's layers at budget 1 (`normd_kernels_bench
// --benchmark_filter=ConvKernel`, Winograd against this file's direct tiles, BENCHMARKS.md):
// 3 into 16 or 32 channels (the stems) ran 0.51-0.90x as fast, 16 into 16 0.80-0.87x, 32 into
// 32 1.13-1.25x, 32 into 64 1.21-1.24x, 64 into 64 1.28-1.55x.
constexpr int64_t kWinogradMinChannels = 32;
// Weight-gradient tiles: (channel, tap) pairs per tile, and vectors of output channels.
constexpr int kGradPairs = 9;
constexpr int kGradWideVectors = kManyRegisters ? 2 : 1;

// The planar forward pass (few input channels, stride 1: the 3-channel stems). A tile holds
// kPlanarCo output channels x V vectors of consecutive output columns of one output row, in
// the output's own layout, so it is stored straight into y (no transpose); each tap loads V
// vectors of a padded input row and multiplies them by kPlanarCo broadcast weights.
constexpr int kPlanarCo = kManyRegisters ? 8 : 4;
// Input channels up to which a stride-1 forward pass is planar. The tiles broadcast each input
// value to vectors of output channels, around a copy into padded planes and a transpose of the
// output, which many input channels share; with 3 they cost as much as the arithmetic. The
// stems at budget 1 (`normd_kernels_bench --benchmark_filter=ConvLayer/.*/3x32x32`), % of the
// FMA peak: forward 33-39 % on the tiles, 56-60 % planar; weight gradient 32-35 % on the
// tiles, 36-38 % planar (3x3 only; a fifth of that pass is Conv2d's bias gradient).
constexpr int64_t kPlanarMaxChannels = 4;
// The planar 3x3 weight gradient's output channels at once: 9 accumulators each (3 measured
// 3-6 % slower than 2 on AVX-512: 27 accumulators leave too few registers).
constexpr int kPlanarGradCo = kManyRegisters ? 2 : 1;

int64_t RoundUp(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// The weight gradients sum a batch of n samples in two fixed halves, [0, n/2) and [n/2, n),
// each into its own buffer, and then add the two in order: the same bits on one core or two.
// Half h (0 or 1) starts at HalfBegin(h, n) and ends at HalfBegin(h + 1, n).
int64_t HalfBegin(int64_t half, int64_t n) { return half == 0 ? 0 : half == 1 ? n / 2 : n; }

// A sample x (channels, h, w) into planes whose rows are row_stride floats apart and whose
// channels are plane_stride apart, at row and column `padding` of each; the padding around is
// the caller's (zeroed once). Vector copies inline: a libc call per short row costs more than
// the row.
void CopyIntoPaddedPlanes(const float* x, int64_t channels, int64_t h, int64_t w,
                          int64_t padding, int64_t row_stride, int64_t plane_stride,
                          float* planes) {
  const int64_t whole = w / kLanes * kLanes;
  for (int64_t c = 0; c < channels; ++c) {
    const float* xc = x + c * h * w;
    float* plane = planes + c * plane_stride + padding * row_stride + padding;
    for (int64_t hh = 0; hh < h; ++hh) {
      float* dst = plane + hh * row_stride;
      const float* src = xc + hh * w;
      for (int64_t j = 0; j < whole; j += kLanes) Store(dst + j, Load(src + j));
      for (int64_t j = whole; j < w; ++j) dst[j] = src[j];
    }
  }
}

// Per-thread scratch, grown to the largest use and then reused without allocating.
float* Scratch(int which, int64_t n) {
  thread_local std::vector<float> buffers[5];
  std::vector<float>& b = buffers[which];
  if (static_cast<int64_t>(b.size()) < n) b.resize(n);
  return b.data();
}
enum ScratchBuffer {
  kPrepared = 0,
  kTransposed = 1,
  kPacked = 2,
  kWinogradInput = 3,    // a block's transformed input (Winograd passes)
  kWinogradProducts = 4  // a block's products, or its transformed output gradients
};

// KB taps of one kernel row whose inputs lie side by side in `row` (a stride-1 row, or one
// column phase of a strided input): tap b, with weights at w0 + b * tap_step, reads `row` at
// offset b, so input value row[m] feeds position m - b of each of the KB taps: one broadcast,
// KB taps. Adds into the caller's tile (kept in registers: always inlined).
template <int V, int P, int KB>
inline __attribute__((always_inline)) void KernelRowTaps(const float* row, const float* w0,
                                                        int64_t tap_step, Vec (&acc)[V][P]) {
  Vec w[KB][V];
  for (int b = 0; b < KB; ++b) {
    for (int j = 0; j < V; ++j) w[b][j] = Load(w0 + b * tap_step + j * kLanes);
  }
#pragma GCC unroll 64
  for (int m = 0; m < P + KB - 1; ++m) {
    const float v = row[m];
#pragma GCC unroll 8
    for (int b = 0; b < KB; ++b) {
      const int q = m - b;
      if (q < 0 || q >= P) continue;
      for (int j = 0; j < V; ++j) acc[j][q] += w[b][j] * v;
    }
  }
}

// One tile of a stride-1 convolution with a K x K kernel: out_t rows [0, P) (positions o0 ..
// o0 + P - 1, `in` already offset by o0), output channels [co0, co0 + V * kLanes); each kernel
// row's K taps share their broadcasts (KernelRowTaps).
template <int V, int P, int K>
void RowReuseTile(const float* in, int64_t channels, int64_t channel_stride, int64_t plane_w,
                  const float* packed, int64_t padded_out, int64_t co0, float* out_t) {
  Vec acc[V][P] = {};
  for (int64_t c = 0; c < channels; ++c) {
    const float* wc = packed + c * K * K * padded_out + co0;
    for (int ki = 0; ki < K; ++ki) {
      KernelRowTaps<V, P, K>(in + c * channel_stride + ki * plane_w, wc + ki * K * padded_out,
                            padded_out, acc);
    }
  }
  for (int q = 0; q < P; ++q) {
    for (int j = 0; j < V; ++j) Store(out_t + q * padded_out + co0 + j * kLanes, acc[j][q]);
  }
}

// One tile of a strided convolution whose column phases hold at most 3 taps of a kernel row
// (ceil(k / stride) <= 3): per channel and kernel row, each column phase's taps share their
// broadcasts as RowReuseTile's do. `in` is offset by the tile's first position.
template <int V, int P>
void StridedTile(const float* in, int64_t channels, int64_t channel_stride, int64_t plane,
                 int64_t plane_w, int64_t kernel, int64_t stride, const float* packed,
                 int64_t padded_out, int64_t co0, float* out_t) {
  Vec acc[V][P] = {};
  for (int64_t c = 0; c < channels; ++c) {
    for (int64_t ki = 0; ki < kernel; ++ki) {
      const float* rows = in + c * channel_stride + (ki % stride) * stride * plane +
                          (ki / stride) * plane_w;
      const float* wrow = packed + (c * kernel + ki) * kernel * padded_out + co0;
      for (int64_t q = 0; q < stride && q < kernel; ++q) {
        const float* row = rows + q * plane;
        const float* w0 = wrow + q * padded_out;
        const int64_t step = stride * padded_out;
        switch ((kernel - q + stride - 1) / stride) {
          case 1: KernelRowTaps<V, P, 1>(row, w0, step, acc); break;
          case 2: KernelRowTaps<V, P, 2>(row, w0, step, acc); break;
          default: KernelRowTaps<V, P, 3>(row, w0, step, acc); break;
        }
      }
    }
  }
  for (int q = 0; q < P; ++q) {
    for (int j = 0; j < V; ++j) Store(out_t + q * padded_out + co0 + j * kLanes, acc[j][q]);
  }
}

// StridedTile for the usual 3x3 kernel with stride 2, its shape known at compile time: per
// channel and kernel row, column phase 0 holds taps 0 and 2, phase 1 tap 1. The same taps in
// the same order as StridedTile, so the same bits.
template <int V, int P>
void Strided3x3Tile(const float* in, int64_t channels, int64_t channel_stride, int64_t plane,
                    int64_t plane_w, const float* packed, int64_t padded_out, int64_t co0,
                    float* out_t) {
  Vec acc[V][P] = {};
  const int64_t step = 2 * padded_out;
  for (int64_t c = 0; c < channels; ++c) {
    const float* base = in + c * channel_stride;
    const float* wc = packed + c * 9 * padded_out + co0;
#pragma GCC unroll 3
    for (int ki = 0; ki < 3; ++ki) {
      const float* rows = base + (ki % 2) * 2 * plane + (ki / 2) * plane_w;
      const float* wrow = wc + ki * 3 * padded_out;
      KernelRowTaps<V, P, 2>(rows, wrow, step, acc);
      KernelRowTaps<V, P, 1>(rows + plane, wrow + padded_out, step, acc);
    }
  }
  for (int q = 0; q < P; ++q) {
    for (int j = 0; j < V; ++j) Store(out_t + q * padded_out + co0 + j * kLanes, acc[j][q]);
  }
}

// One tile of any convolution: the (channel, tap) pairs in order, pair i reading the input at
// pair_offset[i] from the tile's first position.
template <int V, int P>
void GenericTile(const float* in, const int64_t* pair_offset, int64_t pairs, const float* packed,
                 int64_t padded_out, int64_t co0, float* out_t) {
  Vec acc[V][P] = {};
  for (int64_t i = 0; i < pairs; ++i) {
    const float* x = in + pair_offset[i];
    Vec w[V];
    for (int j = 0; j < V; ++j) w[j] = Load(packed + i * padded_out + co0 + j * kLanes);
#pragma GCC unroll 16
    for (int q = 0; q < P; ++q) {
      const float v = x[q];
      for (int j = 0; j < V; ++j) acc[j][q] += w[j] * v;
    }
  }
  for (int q = 0; q < P; ++q) {
    for (int j = 0; j < V; ++j) Store(out_t + q * padded_out + co0 + j * kLanes, acc[j][q]);
  }
}

// Weight gradient of CH input channels' K x K taps for a stride-1 convolution, output channels
// [co0, co0 + V * kLanes): for channel h (planes channel_stride apart from `in`, rows K * K
// apart from grad_rows), grad_rows[h * K * K + ki * K + kj] += sum over o of dy_t[o] *
// in[h * channel_stride + o + ki * plane_w + kj]. Walks the input positions m = o + kj: one
// broadcast of in[m + ki * plane_w] feeds the K taps of kernel row ki, with dy at m, m - 1, ...,
// m - K + 1 kept in registers and shared by the CH channels. Each accumulator sums its positions
// in order whatever CH is, so CH changes no bit.
// REQUIRES: dy_t has K - 1 zero rows before its first position and after its last.
template <int V, int K, int CH = 1>
void WeightGradRowReuseTile(const float* in, int64_t channel_stride, int64_t plane_w,
                            const float* dy_t, int64_t positions, int64_t padded_out,
                            int64_t co0, float* grad_rows) {
  Vec acc[CH][K][K][V] = {};
  Vec window[K][V];  // window[kj] = dy at position m - kj
  for (int kj = 1; kj < K; ++kj) {
    for (int j = 0; j < V; ++j) window[kj][j] = Vec{};
  }
  for (int64_t m = 0; m < positions + K - 1; ++m) {
    for (int j = 0; j < V; ++j) window[0][j] = Load(dy_t + m * padded_out + co0 + j * kLanes);
#pragma GCC unroll 4
    for (int h = 0; h < CH; ++h) {
#pragma GCC unroll 8
      for (int ki = 0; ki < K; ++ki) {
        const float v = in[h * channel_stride + m + ki * plane_w];
#pragma GCC unroll 8
        for (int kj = 0; kj < K; ++kj) {
          for (int j = 0; j < V; ++j) acc[h][ki][kj][j] += window[kj][j] * v;
        }
      }
    }
    for (int kj = K - 1; kj > 0; --kj) {
      for (int j = 0; j < V; ++j) window[kj][j] = window[kj - 1][j];
    }
  }
  for (int h = 0; h < CH; ++h) {
    for (int t = 0; t < K * K; ++t) {
      for (int j = 0; j < V; ++j) {
        float* g = grad_rows + (h * K * K + t) * padded_out + co0 + j * kLanes;
        Store(g, Load(g) + acc[h][t / K][t % K][j]);
      }
    }
  }
}

// Weight gradient of T (channel, tap) pairs for output channels [co0, co0 + V * kLanes):
// grad_rows[t] += sum over positions o of dy_t[o] * src[t][o].
template <int V, int T>
void WeightGradTile(const float* const* src, const float* dy_t, int64_t positions,
                    int64_t padded_out, int64_t co0, float* grad_rows) {
  Vec acc[V][T] = {};
  for (int64_t o = 0; o < positions; ++o) {
    Vec d[V];
    for (int j = 0; j < V; ++j) d[j] = Load(dy_t + o * padded_out + co0 + j * kLanes);
#pragma GCC unroll 16
    for (int t = 0; t < T; ++t) {
      const float v = src[t][o];
      for (int j = 0; j < V; ++j) acc[j][t] += d[j] * v;
    }
  }
  for (int t = 0; t < T; ++t) {
    for (int j = 0; j < V; ++j) {
      float* g = grad_rows + t * padded_out + co0 + j * kLanes;
      Store(g, Load(g) + acc[j][t]);
    }
  }
}

#if !defined(__clang__)
// Shuffle indices of TransposeBlock's rounds: round r swaps blocks of b = kLanes >> (r + 1)
// lanes; kSwap[r][0] picks the new row i (i & b == 0), kSwap[r][1] the new row i + b, from
// lanes of row i (indices < kLanes) and row i + b (indices >= kLanes).
constexpr int kRounds = kLanes == 16 ? 4 : kLanes == 8 ? 3 : 2;
struct SwapIndices {
  int32_t lanes[kRounds][2][kLanes];
};
constexpr SwapIndices MakeSwapIndices() {
  SwapIndices t{};
  for (int r = 0; r < kRounds; ++r) {
    const int b = kLanes >> (r + 1);
    for (int l = 0; l < kLanes; ++l) {
      t.lanes[r][0][l] = (l & b) ? kLanes + l - b : l;
      t.lanes[r][1][l] = (l & b) ? kLanes + l : l + b;
    }
  }
  return t;
}
constexpr SwapIndices kSwap = MakeSwapIndices();
#endif

// Transposes a kLanes x kLanes block in place: rows[i][j] becomes rows[j][i]. Swaps the
// off-diagonal blocks of half the size, then of a quarter, ... (two-input shuffles).
inline void TransposeBlock(Vec* rows) {
#if defined(__clang__)
  // Clang has no __builtin_shuffle taking a vector of indices; its builds (the sanitizer
  // stages) copy elements instead.
  float t[kLanes][kLanes];
  for (int i = 0; i < kLanes; ++i) {
    for (int j = 0; j < kLanes; ++j) t[j][i] = rows[i][j];
  }
  for (int i = 0; i < kLanes; ++i) {
    for (int j = 0; j < kLanes; ++j) rows[i][j] = t[i][j];
  }
#else
  using Index = int32_t __attribute__((vector_size(kLanes * sizeof(int32_t))));
#pragma GCC unroll 4
  for (int r = 0; r < kRounds; ++r) {
    const int b = kLanes >> (r + 1);
    Index low, high;
    std::memcpy(&low, kSwap.lanes[r][0], sizeof low);
    std::memcpy(&high, kSwap.lanes[r][1], sizeof high);
#pragma GCC unroll 16
    for (int i = 0; i < kLanes; ++i) {
      if (i & b) continue;
      const Vec a = rows[i], c = rows[i + b];
      rows[i] = __builtin_shuffle(a, c, low);
      rows[i + b] = __builtin_shuffle(a, c, high);
    }
  }
#endif
}

// dst[c * dst_stride + q] = src[q * src_stride + c] (+ bias[c] when bias is non-null) for
// c < channels, q < count <= kLanes. Whole kLanes x kLanes blocks go through registers.
void TransposeRows(const float* src, int64_t src_stride, int64_t count, int64_t channels,
                   const float* bias, float* dst, int64_t dst_stride) {
  int64_t c0 = 0;
  if (count == kLanes) {
    for (; c0 + kLanes <= channels; c0 += kLanes) {
      Vec rows[kLanes];
      for (int q = 0; q < kLanes; ++q) rows[q] = Load(src + q * src_stride + c0);
      TransposeBlock(rows);
      for (int c = 0; c < kLanes; ++c) {
        Vec v = rows[c];
        if (bias != nullptr) v += bias[c0 + c];
        Store(dst + (c0 + c) * dst_stride, v);
      }
    }
  }
  for (int64_t c = c0; c < channels; ++c) {
    const float b = bias != nullptr ? bias[c] : 0.0f;
    float* d = dst + c * dst_stride;
    if (bias != nullptr) {
      for (int64_t q = 0; q < count; ++q) d[q] = src[q * src_stride + c] + b;
    } else {
      for (int64_t q = 0; q < count; ++q) d[q] = src[q * src_stride + c];
    }
  }
}

// Copies out_t (positions x padded channels, position o = oh * plane_w + ow) into a sample's
// (channels, h_out, w_out) planes, adding bias[c] when bias is non-null.
void TransposeOut(const float* out_t, int64_t padded, int64_t channels, int64_t h_out,
                  int64_t w_out, int64_t plane_w, const float* bias, float* y) {
  for (int64_t oh = 0; oh < h_out; ++oh) {
    for (int64_t ow0 = 0; ow0 < w_out; ow0 += kLanes) {
      TransposeRows(out_t + (oh * plane_w + ow0) * padded, padded,
                    std::min<int64_t>(kLanes, w_out - ow0), channels, bias,
                    y + oh * w_out + ow0, h_out * w_out);
    }
  }
}

// The inverse walk: a sample's dy (channels, h_out, w_out) into dy_t (positions x padded), zero
// at the dropped positions (ow >= w_out, the rounding tail) and the padding channels.
void TransposeIn(const float* dy, int64_t channels, int64_t h_out, int64_t w_out,
                 int64_t plane_w, int64_t positions, int64_t padded, float* dy_t) {
  const int64_t plane = h_out * w_out;
  for (int64_t oh = 0; oh < h_out; ++oh) {
    // The dropped positions of row oh, and with the last row the rounding tail.
    const int64_t zero_end = oh + 1 < h_out ? (oh + 1) * plane_w : positions;
    std::memset(dy_t + (oh * plane_w + w_out) * padded, 0,
                sizeof(float) * (zero_end - oh * plane_w - w_out) * padded);
    if (padded > channels) {
      for (int64_t ow = 0; ow < w_out; ++ow) {
        float* d = dy_t + (oh * plane_w + ow) * padded;
        for (int64_t c = channels; c < padded; ++c) d[c] = 0.0f;
      }
    }
    for (int64_t ow0 = 0; ow0 < w_out; ow0 += kLanes) {
      const int64_t count = std::min<int64_t>(kLanes, w_out - ow0);
      float* dst = dy_t + (oh * plane_w + ow0) * padded;
      const float* src = dy + oh * w_out + ow0;
      int64_t c0 = 0;
      if (count == kLanes) {
        for (; c0 + kLanes <= channels; c0 += kLanes) {
          Vec rows[kLanes];
          for (int c = 0; c < kLanes; ++c) rows[c] = Load(src + (c0 + c) * plane);
          TransposeBlock(rows);
          for (int q = 0; q < kLanes; ++q) Store(dst + q * padded + c0, rows[q]);
        }
      }
      for (int64_t c = c0; c < channels; ++c) {
        for (int64_t q = 0; q < count; ++q) dst[q * padded + c] = src[c * plane + q];
      }
    }
  }
}

// dst[j] = src[j * kStride] for j < count.
template <int kStride>
void CopyEvery(const float* src, int64_t count, float* dst) {
  for (int64_t j = 0; j < count; ++j) dst[j] = src[j * kStride];
}

}  // namespace

DirectConvolution::Planes DirectConvolution::MakePlanes(int64_t channels, int64_t h, int64_t w,
                                                        int64_t kernel, int64_t stride,
                                                        int64_t padding) {
  Planes p;
  p.channels = channels;
  p.h = h;
  p.w = w;
  p.kernel = kernel;
  p.stride = stride;
  p.padding = padding;
  p.h_out = (h + 2 * padding - kernel) / stride + 1;
  p.w_out = (w + 2 * padding - kernel) / stride + 1;
  p.plane_h = (h + 2 * padding + stride - 1) / stride;
  p.plane_w = (w + 2 * padding + stride - 1) / stride;
  p.positions = RoundUp(p.h_out * p.plane_w, kNarrow);
  const int64_t plane = p.plane_h * p.plane_w;
  int64_t max_offset = 0;
  for (int64_t ki = 0; ki < kernel; ++ki) {
    for (int64_t kj = 0; kj < kernel; ++kj) {
      const int64_t phase = (ki % stride) * stride + kj % stride;
      const int64_t offset = phase * plane + (ki / stride) * p.plane_w + kj / stride;
      p.tap_offset.push_back(offset);
      max_offset = std::max(max_offset, offset);
    }
  }
  // Every read of the last tile stays inside the channel's planes; the extra 16 floats keep
  // consecutive channels off the same 4 KiB alias of the cache.
  p.channel_stride =
      RoundUp(std::max(stride * stride * plane, p.positions + max_offset), 16) + 16;
  for (int64_t c = 0; c < channels; ++c) {
    for (int64_t offset : p.tap_offset) p.pair_offset.push_back(c * p.channel_stride + offset);
  }
  if (stride > 1) {
    for (int64_t phase = 0; phase < stride; ++phase) {
      const int64_t first = ((phase - padding) % stride + stride) % stride;
      const int64_t count = first < w ? (w - first + stride - 1) / stride : 0;
      p.column_phases.push_back({first, count, phase * plane + (first + padding) / stride});
    }
  }
  return p;
}

void DirectConvolution::Prepare(const Planes& p, const float* x, float* out) {
  const int64_t s = p.stride;
  const int64_t plane = p.plane_h * p.plane_w;
  for (int64_t c = 0; c < p.channels; ++c) {
    float* oc = out + c * p.channel_stride;
    const float* xc = x + c * p.h * p.w;
    if (s == 1) {
      // Rows of plane_w = w + 2 * padding: the zeros between two rows' data are contiguous.
      // (Plain loops: rows are short, and a libc call per row costs more than the copy.)
      const int64_t first = p.padding * p.plane_w + p.padding;  // where row 0's data starts
      for (int64_t i = 0; i < first; ++i) oc[i] = 0.0f;
      for (int64_t hh = 0; hh < p.h; ++hh) {
        float* row = oc + first + hh * p.plane_w;
        const float* src = xc + hh * p.w;
        for (int64_t i = 0; i < p.w; ++i) row[i] = src[i];
        for (int64_t i = p.w; i < p.plane_w; ++i) row[i] = 0.0f;
      }
      for (int64_t i = first + p.h * p.plane_w; i < p.channel_stride; ++i) oc[i] = 0.0f;
      continue;
    }
    std::memset(oc, 0, sizeof(float) * p.channel_stride);
    // Input row hh is padded row hp = hh + padding: phase row hp % s, row hp / s of it; its
    // column ww likewise goes to phase column (ww + padding) % s, column (ww + padding) / s.
    int64_t row_phase = p.padding % s, row_index = p.padding / s;
    for (int64_t hh = 0; hh < p.h; ++hh) {
      float* row = oc + row_phase * s * plane + row_index * p.plane_w;
      const float* src = xc + hh * p.w;
      for (const ColumnPhase& cp : p.column_phases) {
        if (s == 2) {
          CopyEvery<2>(src + cp.first, cp.count, row + cp.offset);  // vectorises
        } else {
          for (int64_t j = 0; j < cp.count; ++j) row[cp.offset + j] = src[cp.first + j * s];
        }
      }
      if (++row_phase == s) {
        row_phase = 0;
        ++row_index;
      }
    }
  }
}

DirectConvolution::DirectConvolution(const Shape& shape) : shape_(shape) {
  forward_ = MakePlanes(shape.in_channels, shape.h, shape.w, shape.kernel, shape.stride,
                        shape.padding);
  padded_out_ = RoundUp(shape.out_channels, kLanes);
  padded_in_ = RoundUp(shape.in_channels, kLanes);
  if (shape.stride == 1 && shape.padding <= shape.kernel - 1) {
    input_grad_ = MakePlanes(shape.out_channels, forward_.h_out, forward_.w_out, shape.kernel, 1,
                             shape.kernel - 1 - shape.padding);
  } else {
    MakeGradientPhases();
  }
  const int64_t w_out = forward_.w_out;
  if (shape.stride == 1 && shape.in_channels <= kPlanarMaxChannels && w_out >= kLanes &&
      shape.winograd != Shape::Winograd::kAlways) {
    PlanarPlan& p = planar_;
    p.active = true;
    p.h_out = forward_.h_out;
    p.w_out = w_out;
    p.wide = w_out >= 2 * kLanes;
    // Rows long enough for whole-vector loads at every tap of the last tile of a row.
    p.pw = RoundUp(w_out, (p.wide ? 2 : 1) * kLanes) + shape.kernel - 1;
    p.plane_size = (shape.h + 2 * shape.padding) * p.pw;
    p.dyw = RoundUp(w_out, kLanes);
  }
  if (shape.kernel == 3 && shape.stride == 1 && shape.winograd != Shape::Winograd::kNever) {
    const bool enough = shape.winograd == Shape::Winograd::kAlways ||
                        (shape.in_channels >= kWinogradMinChannels &&
                         shape.out_channels >= kWinogradMinChannels);
    if (enough) {
      winograd_forward_ = MakeWinogradPlan(shape.in_channels, shape.out_channels, shape.h,
                                           shape.w, shape.padding);
    }
    if (enough && shape.padding <= 2) {
      winograd_input_grad_ = MakeWinogradPlan(shape.out_channels, shape.in_channels,
                                              forward_.h_out, forward_.w_out, 2 - shape.padding);
    }
  }
}

void DirectConvolution::MakeGradientPhases() {
  const Shape& sh = shape_;
  const Planes& f = forward_;
  const int64_t s = sh.stride, k = sh.kernel;
  phase_lead_ = (k + s - 1) / s - 1;  // the most taps a phase has along an axis, minus one
  phase_plane_w_ = f.plane_w + phase_lead_;
  const int64_t rows = f.plane_h + phase_lead_;
  phase_positions_ = RoundUp(f.plane_h * phase_plane_w_, kNarrow);
  const int64_t max_offset = phase_lead_ * phase_plane_w_ + phase_lead_;
  phase_stride_ = RoundUp(std::max(rows * phase_plane_w_, phase_positions_ + max_offset), 16) + 16;
  for (int64_t r = 0; r < s; ++r) {
    for (int64_t q = 0; q < s; ++q) {
      GradientPhase ph;
      ph.r = r;
      ph.q = q;
      for (int64_t co = 0; co < sh.out_channels; ++co) {
        for (int64_t a = 0; r + a * s < k; ++a) {
          for (int64_t b = 0; q + b * s < k; ++b) {
            // dx phase (i, j) reads dy (i - a, j - b): prepared at (i - a + lead, j - b + lead).
            ph.pair_offset.push_back(co * phase_stride_ + (phase_lead_ - a) * phase_plane_w_ +
                                     phase_lead_ - b);
            ph.tap.push_back(co * sh.in_channels * k * k + (r + a * s) * k + q + b * s);
          }
        }
      }
      ph.first_row = phase_rows_;
      phase_rows_ += static_cast<int64_t>(ph.tap.size());
      phases_.push_back(std::move(ph));
    }
  }
}

namespace {

// out_t (positions x padded_out) = sum over pairs i of packed row i times the input at
// pair_offset[i] from each position: the generic tiles over every output.
void RunGenericKernel(const int64_t* pair_offset, int64_t pairs, int64_t positions,
                      int64_t padded_out, const float* in, const float* packed, float* out_t) {
  const bool wide = (padded_out / kLanes) % 2 == 0;
  for (int64_t co0 = 0; co0 < padded_out; co0 += (wide ? 2 : 1) * kLanes) {
    if (wide) {
      for (int64_t o0 = 0; o0 < positions; o0 += kWide) {
        GenericTile<2, kWide>(in + o0, pair_offset, pairs, packed, padded_out, co0,
                              out_t + o0 * padded_out);
      }
    } else {
      for (int64_t o0 = 0; o0 < positions; o0 += kNarrow) {
        GenericTile<1, kNarrow>(in + o0, pair_offset, pairs, packed, padded_out, co0,
                                out_t + o0 * padded_out);
      }
    }
  }
}

// ---- Winograd F(2x2, 3x3) --------------------------------------------------------------
// A 2x2 block of outputs ("tile") of a stride-1 3x3 correlation is A^T [(G g G^T) . (B^T d B)] A
// for the 4x4 input block d under it and kernel g, with
//   B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1], G = [1 0 0; .5 .5 .5; .5 -.5 .5; 0 0 1],
//   A^T = [1 1 1 0; 0 1 -1 -1]:
// 16 products per tile and channel pair instead of 36. The 16 products of every (tile, channel)
// are 16 independent sums over channels, each a product of the transformed input
// (xi, channel, tile) with the transformed weights (xi, channel, output channel): the generic
// register tiles do them with tiles in place of positions.

// The transformed weights: packed[(xi * channels + c) * padded_out + co] = (G g G^T)[xi] for
// the 3x3 kernel g(ki, kj) = kernel(co, c, ki, kj), computed in double and rounded once; zero
// for the padding output channels.
template <typename Kernel>
void PackWinogradWeights(int64_t channels, int64_t outputs, int64_t padded_out,
                         const Kernel& kernel, float* packed) {
  std::memset(packed, 0, sizeof(float) * 16 * channels * padded_out);
  for (int64_t co = 0; co < outputs; ++co) {
    for (int64_t c = 0; c < channels; ++c) {
      double t[4][3];  // G g
      for (int j = 0; j < 3; ++j) {
        const double g0 = kernel(co, c, 0, j), g1 = kernel(co, c, 1, j), g2 = kernel(co, c, 2, j);
        t[0][j] = g0;
        t[1][j] = 0.5 * (g0 + g1 + g2);
        t[2][j] = 0.5 * (g0 - g1 + g2);
        t[3][j] = g2;
      }
      for (int i = 0; i < 4; ++i) {
        const double u[4] = {t[i][0], 0.5 * (t[i][0] + t[i][1] + t[i][2]),
                             0.5 * (t[i][0] - t[i][1] + t[i][2]), t[i][2]};
        for (int j = 0; j < 4; ++j) {
          packed[((i * 4 + j) * channels + c) * padded_out + co] = static_cast<float>(u[j]);
        }
      }
    }
  }
}

// Every other element of the 2 * kLanes floats a, b (a first), from element kFirst on: the
// even elements (kFirst = 0) or the odd ones (1).
template <int kFirst>
inline Vec EveryOther(Vec a, Vec b) {
#if defined(__clang__)
  Vec r;
  for (int i = 0; i < kLanes; ++i) {
    const int k = 2 * i + kFirst;
    r[i] = k < kLanes ? a[k] : b[k - kLanes];
  }
  return r;
#else
  using Index = int32_t __attribute__((vector_size(kLanes * sizeof(int32_t))));
  Index idx;
  for (int i = 0; i < kLanes; ++i) idx[i] = 2 * i + kFirst;
  return __builtin_shuffle(a, b, idx);
#endif
}

// B^T d B for kLanes tiles side by side in one row of tiles: rows[r] is the plane row r of the
// row of tiles at its first tile's first column (tile j's columns are 2j .. 2j + 3).
// out[xi * xi_step + j] = (B^T d B)[xi] of tile j. The horizontal half runs on each row in
// registers (even and odd columns split by shuffles), then the vertical half; whole vectors
// are stored: lanes past the row's last tile land where the next row of tiles (or the
// rounding tail) is written later.
// REQUIRES: rows readable 2 * kLanes + 2 floats on.
inline void WinogradInputTiles(const float* const (&rows)[4], float* out, int64_t xi_step) {
  Vec h[4][4];  // h[r][s] = (d B)[r][s]
  for (int r = 0; r < 4; ++r) {
    const float* q = rows[r];
    const Vec a = Load(q), b = Load(q + kLanes), a2 = Load(q + 2), b2 = Load(q + 2 + kLanes);
    const Vec d0 = EveryOther<0>(a, b), d1 = EveryOther<1>(a, b);
    const Vec d2 = EveryOther<0>(a2, b2), d3 = EveryOther<1>(a2, b2);
    h[r][0] = d0 - d2;
    h[r][1] = d1 + d2;
    h[r][2] = d2 - d1;
    h[r][3] = d1 - d3;
  }
  for (int s = 0; s < 4; ++s) {
    Store(out + s * xi_step, h[0][s] - h[2][s]);
    Store(out + (4 + s) * xi_step, h[1][s] + h[2][s]);
    Store(out + (8 + s) * xi_step, h[2][s] - h[1][s]);
    Store(out + (12 + s) * xi_step, h[1][s] - h[3][s]);
  }
}

// A^T m A for the 16 products m[xi] (vectors of output channels) of one tile: its 2x2 outputs.
inline void WinogradOutputTile(const Vec (&m)[16], Vec* y00, Vec* y01, Vec* y10, Vec* y11) {
  Vec a0[4], a1[4];
  for (int s = 0; s < 4; ++s) {
    a0[s] = m[s] + m[4 + s] + m[8 + s];
    a1[s] = m[4 + s] - m[8 + s] - m[12 + s];
  }
  *y00 = a0[0] + a0[1] + a0[2];
  *y01 = a0[1] - a0[2] - a0[3];
  *y10 = a1[0] + a1[1] + a1[2];
  *y11 = a1[1] - a1[2] - a1[3];
}

// The weight-gradient tiles for `count` (1 to 8) input channels at once (WinogradWeightGradient):
// channel counts that are multiples of 8 take whole tiles only.
void WinogradGradTiles(bool wide, int count, const float* const* src, const float* dm,
                       int64_t tiles, int64_t padded_out, int64_t co0, float* grad_rows) {
  switch ((wide ? 8 : 0) + count - 1) {
#define NORMD_GRAD_TILE(V, T) \
  case (V == 2 ? 8 : 0) + T - 1: \
    WeightGradTile<V, T>(src, dm, tiles, padded_out, co0, grad_rows); \
    break;
    NORMD_GRAD_TILE(1, 1) NORMD_GRAD_TILE(1, 2) NORMD_GRAD_TILE(1, 3) NORMD_GRAD_TILE(1, 4)
    NORMD_GRAD_TILE(1, 5) NORMD_GRAD_TILE(1, 6) NORMD_GRAD_TILE(1, 7) NORMD_GRAD_TILE(1, 8)
    NORMD_GRAD_TILE(2, 1) NORMD_GRAD_TILE(2, 2) NORMD_GRAD_TILE(2, 3) NORMD_GRAD_TILE(2, 4)
    NORMD_GRAD_TILE(2, 5) NORMD_GRAD_TILE(2, 6) NORMD_GRAD_TILE(2, 7) NORMD_GRAD_TILE(2, 8)
#undef NORMD_GRAD_TILE
    default:
      break;
  }
}


// One output row of a block of kPlanarCo output channels: y[j * plane_out + ow] for j < count,
// ow < w_out, from planes (channels x plane_size floats, rows pw apart, zero-padded) and
// weights packed [c][kh][kw][kPlanarCo]. Sums channels in order, taps in row-major order.
// K > 0: the kernel size known at compile time (k is then K); 0: any, at run time.
template <int V, int K>
void PlanarForwardRow(const float* planes, int64_t plane_size, int64_t pw, int64_t channels,
                      int64_t runtime_k, const float* packed, int64_t w_out, const float* bias,
                      int64_t count, float* y, int64_t plane_out) {
  const int64_t k = K > 0 ? K : runtime_k;
  for (int64_t ow0 = 0; ow0 < w_out; ow0 += V * kLanes) {
    Vec acc[kPlanarCo][V] = {};
    const float* wv = packed;
    for (int64_t c = 0; c < channels; ++c) {
      for (int64_t kh = 0; kh < k; ++kh) {
        const float* row = planes + c * plane_size + kh * pw + ow0;
        for (int64_t kw = 0; kw < k; ++kw, wv += kPlanarCo) {
          Vec xv[V];
          for (int v = 0; v < V; ++v) xv[v] = Load(row + kw + v * kLanes);
          for (int j = 0; j < kPlanarCo; ++j) {
            const float w = wv[j];
            for (int v = 0; v < V; ++v) acc[j][v] += w * xv[v];
          }
        }
      }
    }
    const int64_t cols = std::min<int64_t>(V * kLanes, w_out - ow0);
    for (int64_t j = 0; j < count; ++j) {
      if (bias != nullptr) {
        for (int v = 0; v < V; ++v) acc[j][v] += bias[j];
      }
      float* dst = y + j * plane_out + ow0;
      if (cols == V * kLanes) {
        for (int v = 0; v < V; ++v) Store(dst + v * kLanes, acc[j][v]);
        continue;
      }
      float out[V * kLanes];
      for (int v = 0; v < V; ++v) Store(out + v * kLanes, acc[j][v]);
      std::memcpy(dst, out, sizeof(float) * cols);
    }
  }
}

// The planar weight gradient of G output channels and one input channel, 3x3: adds
// dy[j][oh][ow] x plane[(oh + kh) * pw + ow + kw] over h_out rows of dyw columns (dy rows dyw
// apart, zero past the outputs) to the lanes acc[j] + (kh * 3 + kw) * kLanes. Each step loads
// G vectors of dy and the 9 input vectors under them, for 9 G multiply-adds.
template <int G>
void PlanarGrad3x3(const float* plane, int64_t pw, const float* const* dy, int64_t dyw,
                   int64_t h_out, float* const* acc) {
  Vec a[G][9];
  for (int j = 0; j < G; ++j) {
    for (int t = 0; t < 9; ++t) a[j][t] = Load(acc[j] + t * kLanes);
  }
  for (int64_t oh = 0; oh < h_out; ++oh) {
    const float* row = plane + oh * pw;
    for (int64_t ow0 = 0; ow0 < dyw; ow0 += kLanes) {
      Vec d[G];
      for (int j = 0; j < G; ++j) d[j] = Load(dy[j] + oh * dyw + ow0);
      for (int kh = 0; kh < 3; ++kh) {
        for (int kw = 0; kw < 3; ++kw) {
          const Vec xv = Load(row + kh * pw + ow0 + kw);
          for (int j = 0; j < G; ++j) a[j][kh * 3 + kw] += d[j] * xv;
        }
      }
    }
  }
  for (int j = 0; j < G; ++j) {
    for (int t = 0; t < 9; ++t) Store(acc[j] + t * kLanes, a[j][t]);
  }
}

}  // namespace

void DirectConvolution::RunForwardKernel(const Planes& p, int64_t padded_out, const float* in,
                                         const float* packed, float* out_t) const {
  const bool wide = (padded_out / kLanes) % 2 == 0;
  if (p.stride > 1 && (p.kernel + p.stride - 1) / p.stride <= 3) {
    const int64_t plane = p.plane_h * p.plane_w;
    const bool fixed = p.kernel == 3 && p.stride == 2;
    for (int64_t co0 = 0; co0 < padded_out; co0 += (wide ? 2 : 1) * kLanes) {
      if (wide) {
        for (int64_t o0 = 0; o0 < p.positions; o0 += kWide) {
          if (fixed) {
            Strided3x3Tile<2, kWide>(in + o0, p.channels, p.channel_stride, plane, p.plane_w,
                                     packed, padded_out, co0, out_t + o0 * padded_out);
            continue;
          }
          StridedTile<2, kWide>(in + o0, p.channels, p.channel_stride, plane, p.plane_w,
                                p.kernel, p.stride, packed, padded_out, co0,
                                out_t + o0 * padded_out);
        }
      } else {
        for (int64_t o0 = 0; o0 < p.positions; o0 += kNarrow) {
          if (fixed) {
            Strided3x3Tile<1, kNarrow>(in + o0, p.channels, p.channel_stride, plane, p.plane_w,
                                       packed, padded_out, co0, out_t + o0 * padded_out);
            continue;
          }
          StridedTile<1, kNarrow>(in + o0, p.channels, p.channel_stride, plane, p.plane_w,
                                  p.kernel, p.stride, packed, padded_out, co0,
                                  out_t + o0 * padded_out);
        }
      }
    }
    return;
  }
  if (p.kernel != 3 || p.stride != 1) {
    RunGenericKernel(p.pair_offset.data(), static_cast<int64_t>(p.pair_offset.size()),
                     p.positions, padded_out, in, packed, out_t);
    return;
  }
  for (int64_t co0 = 0; co0 < padded_out; co0 += (wide ? 2 : 1) * kLanes) {
    if (wide) {
      for (int64_t o0 = 0; o0 < p.positions; o0 += kWide) {
        RowReuseTile<2, kWide, 3>(in + o0, p.channels, p.channel_stride, p.plane_w, packed,
                                  padded_out, co0, out_t + o0 * padded_out);
      }
    } else {
      for (int64_t o0 = 0; o0 < p.positions; o0 += kNarrow) {
        RowReuseTile<1, kNarrow, 3>(in + o0, p.channels, p.channel_stride, p.plane_w, packed,
                                    padded_out, co0, out_t + o0 * padded_out);
      }
    }
  }
}

void DirectConvolution::Forward(const float* x, int64_t n, const float* weight,
                                const float* bias, float* y) const {
  const Shape& s = shape_;
  if (winograd_forward_.channels > 0) {
    const int64_t per_out = s.in_channels * 9;
    float* packed = Scratch(kPacked, 16 * s.in_channels * padded_out_);
    PackWinogradWeights(
        s.in_channels, s.out_channels, padded_out_,
        [&](int64_t co, int64_t c, int ki, int kj) {
          return weight[co * per_out + c * 9 + ki * 3 + kj];
        },
        packed);
    WinogradSamples(winograd_forward_, x, n, packed, bias, y);
    return;
  }
  if (planar_.active) {
    PlanarForward(x, n, weight, bias, y);
    return;
  }
  const Planes& p = forward_;
  const int64_t taps = s.kernel * s.kernel;
  // packed[(c * taps + t) * padded_out + co] = weight[co, c, t], zero for the padding channels.
  float* packed = Scratch(kPacked, s.in_channels * taps * padded_out_);
  std::memset(packed, 0, sizeof(float) * s.in_channels * taps * padded_out_);
  for (int64_t co = 0; co < s.out_channels; ++co) {
    for (int64_t i = 0; i < s.in_channels * taps; ++i) {
      packed[i * padded_out_ + co] = weight[co * s.in_channels * taps + i];
    }
  }
  ConvolveSamples(p, x, n, packed, padded_out_, s.out_channels, bias, y);
}

void DirectConvolution::ConvolveSamples(const Planes& p, const float* in, int64_t n,
                                        const float* packed, int64_t padded_out,
                                        int64_t out_channels, const float* bias,
                                        float* out) const {
  const int64_t in_sample = p.channels * p.h * p.w;
  const int64_t out_sample = out_channels * p.h_out * p.w_out;
  const int64_t work =
      n * out_channels * static_cast<int64_t>(p.pair_offset.size()) * p.h_out * p.w_out;
  SplitInTwo(n, 1, work, [&](int64_t begin, int64_t end) {
    float* prepared = Scratch(kPrepared, p.channels * p.channel_stride);
    float* out_t = Scratch(kTransposed, p.positions * padded_out);
    for (int64_t i = begin; i < end; ++i) {
      Prepare(p, in + i * in_sample, prepared);
      RunForwardKernel(p, padded_out, prepared, packed, out_t);
      TransposeOut(out_t, padded_out, out_channels, p.h_out, p.w_out, p.plane_w, bias,
                   out + i * out_sample);
    }
  });
}

void DirectConvolution::PreparePlanar(const float* x, float* planes) const {
  const Shape& s = shape_;
  CopyIntoPaddedPlanes(x, s.in_channels, s.h, s.w, s.padding, planar_.pw, planar_.plane_size,
                       planes);
}

void DirectConvolution::PlanarForward(const float* x, int64_t n, const float* weight,
                                      const float* bias, float* y) const {
  const Shape& s = shape_;
  const PlanarPlan& p = planar_;
  const int64_t k = s.kernel, taps = s.in_channels * k * k;
  const int64_t blocks = (s.out_channels + kPlanarCo - 1) / kPlanarCo;
  // packed[((block * C_in + c) * k + kh) * k + kw][j] = weight[block * kPlanarCo + j, c, kh, kw],
  // zero past the last output channel.
  float* packed = Scratch(kPacked, blocks * taps * kPlanarCo);
  for (int64_t b = 0; b < blocks; ++b) {
    for (int64_t t = 0; t < taps; ++t) {
      for (int j = 0; j < kPlanarCo; ++j) {
        const int64_t co = b * kPlanarCo + j;
        packed[(b * taps + t) * kPlanarCo + j] = co < s.out_channels ? weight[co * taps + t] : 0;
      }
    }
  }
  const int64_t in_sample = s.in_channels * s.h * s.w;
  const int64_t plane_out = p.h_out * p.w_out;
  const int64_t out_sample = s.out_channels * plane_out;
  const int64_t work = n * s.out_channels * taps * plane_out;
  SplitInTwo(n, 1, work, [&](int64_t begin, int64_t end) {
    float* planes = Scratch(kPrepared, s.in_channels * p.plane_size);
    std::memset(planes, 0, sizeof(float) * s.in_channels * p.plane_size);
    for (int64_t i = begin; i < end; ++i) {
      PreparePlanar(x + i * in_sample, planes);
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t co0 = b * kPlanarCo;
        const int64_t count = std::min<int64_t>(kPlanarCo, s.out_channels - co0);
        const float* w = packed + b * taps * kPlanarCo;
        const float* bb = bias != nullptr ? bias + co0 : nullptr;
        for (int64_t oh = 0; oh < p.h_out; ++oh) {
          float* out = y + i * out_sample + co0 * plane_out + oh * p.w_out;
          const float* in = planes + oh * p.pw;
          if (p.wide && k == 3) {
            PlanarForwardRow<2, 3>(in, p.plane_size, p.pw, s.in_channels, k, w, p.w_out, bb,
                                   count, out, plane_out);
          } else if (p.wide) {
            PlanarForwardRow<2, 0>(in, p.plane_size, p.pw, s.in_channels, k, w, p.w_out, bb,
                                   count, out, plane_out);
          } else if (k == 3) {
            PlanarForwardRow<1, 3>(in, p.plane_size, p.pw, s.in_channels, k, w, p.w_out, bb,
                                   count, out, plane_out);
          } else {
            PlanarForwardRow<1, 0>(in, p.plane_size, p.pw, s.in_channels, k, w, p.w_out, bb,
                                   count, out, plane_out);
          }
        }
      }
    }
  });
}

void DirectConvolution::PlanarWeightGradient(const float* x, const float* dy, int64_t n,
                                             float* weight_grad) const {
  const Shape& s = shape_;
  const PlanarPlan& p = planar_;
  const int64_t taps = s.in_channels * 9;
  // Per half of the batch, one vector of lane sums per weight (co, c, kh, kw), in that order.
  const int64_t grad_size = s.out_channels * taps * kLanes;
  float* halves = Scratch(kPacked, 2 * grad_size);
  std::memset(halves, 0, sizeof(float) * 2 * grad_size);
  const int64_t in_sample = s.in_channels * s.h * s.w;
  const int64_t plane_out = p.h_out * p.w_out;
  const int64_t out_sample = s.out_channels * plane_out;
  const bool copy_dy = p.dyw != p.w_out;  // rows that end mid-vector get zeros after them
  const int64_t work = n * s.out_channels * taps * plane_out;
  SplitInTwo(2, 1, work, [&](int64_t begin, int64_t end) {
    float* planes = Scratch(kPrepared, s.in_channels * p.plane_size);
    std::memset(planes, 0, sizeof(float) * s.in_channels * p.plane_size);
    float* dy_p = copy_dy ? Scratch(kTransposed, s.out_channels * p.h_out * p.dyw) : nullptr;
    if (copy_dy) std::memset(dy_p, 0, sizeof(float) * s.out_channels * p.h_out * p.dyw);
    for (int64_t half = begin; half < end; ++half) {
      float* grad = halves + half * grad_size;
      for (int64_t i = HalfBegin(half, n); i < HalfBegin(half + 1, n); ++i) {
        PreparePlanar(x + i * in_sample, planes);
        const float* d = dy + i * out_sample;
        if (copy_dy) {
          for (int64_t r = 0; r < s.out_channels * p.h_out; ++r) {
            std::memcpy(dy_p + r * p.dyw, d + r * p.w_out, sizeof(float) * p.w_out);
          }
          d = dy_p;
        }
        const int64_t dy_plane = p.h_out * p.dyw;
        int64_t co = 0;
        for (; co + kPlanarGradCo <= s.out_channels; co += kPlanarGradCo) {
          const float* rows[kPlanarGradCo];
          for (int j = 0; j < kPlanarGradCo; ++j) rows[j] = d + (co + j) * dy_plane;
          for (int64_t c = 0; c < s.in_channels; ++c) {
            float* acc[kPlanarGradCo];  // the 9 lane vectors of (co + j, c, *)
            for (int j = 0; j < kPlanarGradCo; ++j) {
              acc[j] = grad + ((co + j) * taps + c * 9) * kLanes;
            }
            PlanarGrad3x3<kPlanarGradCo>(planes + c * p.plane_size, p.pw, rows, p.dyw, p.h_out,
                                         acc);
          }
        }
        for (; co < s.out_channels; ++co) {
          const float* rows[1] = {d + co * dy_plane};
          for (int64_t c = 0; c < s.in_channels; ++c) {
            float* acc[1] = {grad + (co * taps + c * 9) * kLanes};
            PlanarGrad3x3<1>(planes + c * p.plane_size, p.pw, rows, p.dyw, p.h_out, acc);
          }
        }
      }
    }
  });
  // Each weight: its lanes summed in order, per half, then the two halves added in order: the
  // same bits on one thread or two.
  for (int64_t wi = 0; wi < s.out_channels * taps; ++wi) {
    float sum[2];
    for (int h = 0; h < 2; ++h) {
      const float* lanes = halves + h * grad_size + wi * kLanes;
      float t = 0.0f;
      for (int l = 0; l < kLanes; ++l) t += lanes[l];
      sum[h] = t;
    }
    weight_grad[wi] += sum[0] + sum[1];
  }
}

DirectConvolution::WinogradPlan DirectConvolution::MakeWinogradPlan(int64_t channels,
                                                                    int64_t outputs,
                                                                    int64_t h, int64_t w,
                                                                    int64_t padding) {
  WinogradPlan p;
  p.channels = channels;
  p.outputs = outputs;
  p.h = h;
  p.w = w;
  p.padding = padding;
  p.h_out = h + 2 * padding - 2;
  p.w_out = w + 2 * padding - 2;
  p.tiles_h = (p.h_out + 1) / 2;
  p.tiles_w = (p.w_out + 1) / 2;
  // Blocks of whole tile rows, about 64 tiles each: a block's transformed input and products
  // stay in the core's caches between the transforms and the products.
  p.block_rows = std::max<int64_t>(1, std::min(p.tiles_h, 64 / p.tiles_w));
  p.positions = RoundUp(p.block_rows * p.tiles_w, kNarrow);
  // Room for the whole-vector stores of a block's last tiles (WinogradInputTiles).
  p.tile_stride = RoundUp(std::max(p.positions, p.block_rows * p.tiles_w + kLanes), 16) + 16;
  p.plane_h = 2 * p.tiles_h + 2;
  p.plane_w = 2 * p.tiles_w + 2;
  // Whole vectors are read past a plane's last row (WinogradInputTiles).
  p.plane_stride = RoundUp(p.plane_h * p.plane_w + 3 * kLanes, 16) + 16;
  p.padded_out = RoundUp(outputs, kLanes);
  // Strides that are not multiples of 4 KiB, so the 16 arrays written or read together do not
  // compete for the same cache sets.
  p.xi_step = channels * p.tile_stride + 16;
  p.product_step = p.positions * p.padded_out + 3 * kLanes;
  for (int64_t c = 0; c < channels; ++c) p.pair_offset.push_back(c * p.tile_stride);
  return p;
}

void DirectConvolution::PrepareWinogradPlanes(const WinogradPlan& p, const float* x,
                                              float* planes) {
  CopyIntoPaddedPlanes(x, p.channels, p.h, p.w, p.padding, p.plane_w, p.plane_stride, planes);
}

void DirectConvolution::WinogradInputBlock(const WinogradPlan& p, const float* planes,
                                           int64_t ti0, int64_t rows, float* v) {
  for (int64_t c = 0; c < p.channels; ++c) {
    const float* plane = planes + c * p.plane_stride;
    for (int64_t r = 0; r < rows; ++r) {
      const float* row = plane + 2 * (ti0 + r) * p.plane_w;
      for (int64_t j0 = 0; j0 < p.tiles_w; j0 += kLanes) {
        const float* const quad[4] = {row + 2 * j0, row + p.plane_w + 2 * j0,
                                      row + 2 * p.plane_w + 2 * j0, row + 3 * p.plane_w + 2 * j0};
        WinogradInputTiles(quad, v + c * p.tile_stride + r * p.tiles_w + j0, p.xi_step);
      }
    }
  }
}

void DirectConvolution::WinogradSamples(const WinogradPlan& p, const float* in, int64_t n,
                                        const float* packed, const float* bias,
                                        float* out) const {
  const int64_t in_sample = p.channels * p.h * p.w;
  const int64_t out_sample = p.outputs * p.h_out * p.w_out;
  const int64_t padded_out = p.padded_out, xi_step = p.xi_step, m_step = p.product_step;
  const int64_t out_w = 2 * p.tiles_w;  // row length of the untransformed outputs
  const int64_t work = n * p.outputs * p.channels * 9 * p.h_out * p.w_out;
  SplitInTwo(n, 1, work, [&](int64_t begin, int64_t end) {
    float* planes = Scratch(kPrepared, p.channels * p.plane_stride);
    float* v = Scratch(kWinogradInput, 16 * xi_step);
    float* m = Scratch(kWinogradProducts, 16 * m_step);
    float* out_t = Scratch(kTransposed, 2 * p.tiles_h * out_w * padded_out);
    // The planes' zeros stay zero: only their data is rewritten.
    std::memset(planes, 0, sizeof(float) * p.channels * p.plane_stride);
    for (int64_t i = begin; i < end; ++i) {
      PrepareWinogradPlanes(p, in + i * in_sample, planes);
      for (int64_t ti0 = 0; ti0 < p.tiles_h; ti0 += p.block_rows) {
        const int64_t rows = std::min(p.block_rows, p.tiles_h - ti0);
        const int64_t tiles = rows * p.tiles_w;
        WinogradInputBlock(p, planes, ti0, rows, v);
        // The 16 products, each a sum over channels.
        const int64_t positions = RoundUp(tiles, kNarrow);
        for (int xi = 0; xi < 16; ++xi) {
          RunGenericKernel(p.pair_offset.data(), p.channels, positions, padded_out,
                           v + xi * xi_step, packed + xi * p.channels * padded_out,
                           m + xi * m_step);
        }
        // Back to outputs: out_t (2 tiles_h x 2 tiles_w positions, padded_out channels each).
        for (int64_t t = 0; t < tiles; ++t) {
          const int64_t ti = ti0 + t / p.tiles_w, tj = t % p.tiles_w;
          float* o00 = out_t + (2 * ti * out_w + 2 * tj) * padded_out;
          float* o10 = o00 + out_w * padded_out;
          for (int64_t co0 = 0; co0 < padded_out; co0 += kLanes) {
            Vec mv[16];
            for (int xi = 0; xi < 16; ++xi) {
              mv[xi] = Load(m + xi * m_step + t * padded_out + co0);
            }
            Vec y00, y01, y10, y11;
            WinogradOutputTile(mv, &y00, &y01, &y10, &y11);
            Store(o00 + co0, y00);
            Store(o00 + padded_out + co0, y01);
            Store(o10 + co0, y10);
            Store(o10 + padded_out + co0, y11);
          }
        }
      }
      TransposeOut(out_t, padded_out, p.outputs, p.h_out, p.w_out, out_w, bias,
                   out + i * out_sample);
    }
  });
}

void DirectConvolution::InputGradient(const float* dy, int64_t n, const float* weight,
                                      float* dx) const {
  if (input_grad_.channels == 0) {
    PhaseInputGradient(dy, n, weight, dx);
    return;
  }
  const Shape& s = shape_;
  if (winograd_input_grad_.channels > 0) {
    // The flipped kernel with its channel axes swapped, as below.
    const int64_t per_out = s.in_channels * 9;
    float* packed = Scratch(kPacked, 16 * s.out_channels * padded_in_);
    PackWinogradWeights(
        s.out_channels, s.in_channels, padded_in_,
        [&](int64_t c, int64_t co, int ki, int kj) {
          return weight[co * per_out + c * 9 + (2 - ki) * 3 + (2 - kj)];
        },
        packed);
    WinogradSamples(winograd_input_grad_, dy, n, packed, nullptr, dx);
    return;
  }
  const Planes& p = input_grad_;
  const int64_t taps = s.kernel * s.kernel;
  // The flipped kernel with its channel axes swapped:
  // packed[(co * taps + t) * padded_in + c] = weight[co, c, taps - 1 - t].
  float* packed = Scratch(kPacked, s.out_channels * taps * padded_in_);
  std::memset(packed, 0, sizeof(float) * s.out_channels * taps * padded_in_);
  for (int64_t co = 0; co < s.out_channels; ++co) {
    for (int64_t c = 0; c < s.in_channels; ++c) {
      const float* w = weight + (co * s.in_channels + c) * taps;
      for (int64_t t = 0; t < taps; ++t) {
        packed[(co * taps + t) * padded_in_ + c] = w[taps - 1 - t];
      }
    }
  }
  ConvolveSamples(p, dy, n, packed, padded_in_, s.in_channels, nullptr, dx);
}

void DirectConvolution::AccumulateWeightGradient(const float* x, const float* dy, int64_t n,
                                                 float* weight_grad) const {
  if (winograd_forward_.channels > 0) {
    WinogradWeightGradient(x, dy, n, weight_grad);
    return;
  }
  if (planar_.active && shape_.kernel == 3) {
    PlanarWeightGradient(x, dy, n, weight_grad);
    return;
  }
  const Shape& s = shape_;
  const Planes& p = forward_;
  const int64_t taps = s.kernel * s.kernel;
  const int64_t pairs = s.in_channels * taps;
  const int64_t grad_size = pairs * padded_out_;
  // Two halves of the batch, each summed into its own packed gradient (rows by (channel, tap)
  // pair, padded_out floats each), then added in order: the same bits on one thread or two.
  float* halves = Scratch(kPacked, 2 * grad_size);
  std::memset(halves, 0, sizeof(float) * 2 * grad_size);
  const int64_t in_sample = s.in_channels * s.h * s.w;
  const int64_t out_sample = s.out_channels * p.h_out * p.w_out;
  const int64_t work = n * s.out_channels * pairs * p.h_out * p.w_out;
  const bool wide = kGradWideVectors == 2 && (padded_out_ / kLanes) % 2 == 0;
  const bool row_reuse = s.kernel == 3 && s.stride == 1;
  // dy_t carries guard rows of zeros before and after its positions (WeightGradRowReuseTile).
  const int64_t guard = (s.kernel - 1) * padded_out_;
  SplitInTwo(2, 1, work, [&](int64_t begin, int64_t end) {
    float* in = Scratch(kPrepared, p.channels * p.channel_stride);
    float* guarded = Scratch(kTransposed, p.positions * padded_out_ + 2 * guard);
    float* dy_t = guarded + guard;
    std::memset(guarded, 0, sizeof(float) * guard);
    std::memset(dy_t + p.positions * padded_out_, 0, sizeof(float) * guard);
    for (int64_t half = begin; half < end; ++half) {
      float* grad = halves + half * grad_size;
      for (int64_t i = HalfBegin(half, n); i < HalfBegin(half + 1, n); ++i) {
        Prepare(p, x + i * in_sample, in);
        TransposeIn(dy + i * out_sample, s.out_channels, p.h_out, p.w_out, p.plane_w,
                    p.positions, padded_out_, dy_t);
        for (int64_t co0 = 0; co0 < padded_out_; co0 += (wide ? 2 : 1) * kLanes) {
          if (row_reuse) {
            int64_t c = 0;
            if (!wide && kManyRegisters) {
              // One vector of output channels leaves registers for two input channels at once
              // (AVX-512's 32), which then share each load of dy.
              for (; c + 2 <= s.in_channels; c += 2) {
                WeightGradRowReuseTile<1, 3, 2>(in + c * p.channel_stride, p.channel_stride,
                                                p.plane_w, dy_t, p.positions, padded_out_, co0,
                                                grad + c * taps * padded_out_);
              }
            }
            for (; c < s.in_channels; ++c) {
              const float* plane = in + c * p.channel_stride;
              float* rows = grad + c * taps * padded_out_;
              if (wide) {
                WeightGradRowReuseTile<2, 3>(plane, p.channel_stride, p.plane_w, dy_t,
                                             p.positions, padded_out_, co0, rows);
              } else {
                WeightGradRowReuseTile<1, 3>(plane, p.channel_stride, p.plane_w, dy_t,
                                             p.positions, padded_out_, co0, rows);
              }
            }
            continue;
          }
          const float* src[kGradPairs];
          int64_t pair = 0;
          for (; pair + kGradPairs <= pairs; pair += kGradPairs) {
            for (int t = 0; t < kGradPairs; ++t) src[t] = in + p.pair_offset[pair + t];
            float* rows = grad + pair * padded_out_;
            if (wide) {
              WeightGradTile<2, kGradPairs>(src, dy_t, p.positions, padded_out_, co0, rows);
            } else {
              WeightGradTile<1, kGradPairs>(src, dy_t, p.positions, padded_out_, co0, rows);
            }
          }
          for (; pair < pairs; ++pair) {
            src[0] = in + p.pair_offset[pair];
            float* rows = grad + pair * padded_out_;
            if (wide) {
              WeightGradTile<2, 1>(src, dy_t, p.positions, padded_out_, co0, rows);
            } else {
              WeightGradTile<1, 1>(src, dy_t, p.positions, padded_out_, co0, rows);
            }
          }
        }
      }
    }
  });
  for (int64_t co = 0; co < s.out_channels; ++co) {
    for (int64_t i = 0; i < pairs; ++i) {
      weight_grad[co * pairs + i] +=
          halves[i * padded_out_ + co] + halves[grad_size + i * padded_out_ + co];
    }
  }
}

// The weight gradient by the same transform: with M = U . V the 16 products of a tile and
// y = A^T M A, dL/dM = A dy A^T for the tile's 2x2 output gradients dy, so
// dL/dU[xi] = sum over tiles of dL/dM[xi] (output channels) times V[xi] (input channels), a
// product whose inner dimension is the tiles (the weight-gradient register tiles, with tiles
// in place of positions), and dL/dg = G^T (dL/dU) G. Two halves of the batch, as the direct
// path: the same bits on one thread or two.
void DirectConvolution::WinogradWeightGradient(const float* x, const float* dy, int64_t n,
                                               float* weight_grad) const {
  const Shape& s = shape_;
  const WinogradPlan& p = winograd_forward_;
  const int64_t channels = s.in_channels;
  const int64_t grad_size = 16 * channels * padded_out_;  // dL/dU[xi][c][co]
  float* halves = Scratch(kPacked, 2 * grad_size);
  std::memset(halves, 0, sizeof(float) * 2 * grad_size);
  const int64_t in_sample = channels * s.h * s.w;
  const int64_t out_sample = s.out_channels * p.h_out * p.w_out;
  const int64_t xi_step = p.xi_step, m_step = p.product_step;
  const int64_t out_w = 2 * p.tiles_w;
  const int64_t dy_positions = 2 * p.tiles_h * out_w;
  const int64_t work = n * s.out_channels * channels * 9 * p.h_out * p.w_out;
  const bool wide = kGradWideVectors == 2 && (padded_out_ / kLanes) % 2 == 0;
  SplitInTwo(2, 1, work, [&](int64_t begin, int64_t end) {
    float* planes = Scratch(kPrepared, channels * p.plane_stride);
    float* v = Scratch(kWinogradInput, 16 * xi_step);
    float* dm = Scratch(kWinogradProducts, 16 * m_step);
    float* dy_t = Scratch(kTransposed, dy_positions * padded_out_);
    std::memset(planes, 0, sizeof(float) * channels * p.plane_stride);
    for (int64_t half = begin; half < end; ++half) {
      float* grad = halves + half * grad_size;
      for (int64_t i = HalfBegin(half, n); i < HalfBegin(half + 1, n); ++i) {
        PrepareWinogradPlanes(p, x + i * in_sample, planes);
        // dy as (positions, channels), zero past the outputs (odd sizes' last tiles).
        TransposeIn(dy + i * out_sample, s.out_channels, p.h_out, p.w_out, out_w, dy_positions,
                    padded_out_, dy_t);
        for (int64_t ti0 = 0; ti0 < p.tiles_h; ti0 += p.block_rows) {
          const int64_t tile_rows = std::min(p.block_rows, p.tiles_h - ti0);
          const int64_t tiles = tile_rows * p.tiles_w;
          WinogradInputBlock(p, planes, ti0, tile_rows, v);
          // dm[xi * m_step + tile * padded_out + co] = (A dy A^T)[xi].
          for (int64_t t = 0; t < tiles; ++t) {
            const int64_t ti = ti0 + t / p.tiles_w, tj = t % p.tiles_w;
            const float* g00 = dy_t + (2 * ti * out_w + 2 * tj) * padded_out_;
            const float* g10 = g00 + out_w * padded_out_;
            float* out = dm + t * padded_out_;
            for (int64_t co0 = 0; co0 < padded_out_; co0 += kLanes) {
              const Vec a = Load(g00 + co0), b = Load(g00 + padded_out_ + co0);
              const Vec c = Load(g10 + co0), d = Load(g10 + padded_out_ + co0);
              const Vec rows[4][2] = {{a, b}, {a + c, b + d}, {a - c, b - d}, {-c, -d}};
              for (int r = 0; r < 4; ++r) {
                Store(out + (4 * r) * m_step + co0, rows[r][0]);
                Store(out + (4 * r + 1) * m_step + co0, rows[r][0] + rows[r][1]);
                Store(out + (4 * r + 2) * m_step + co0, rows[r][0] - rows[r][1]);
                Store(out + (4 * r + 3) * m_step + co0, -rows[r][1]);
              }
            }
          }
          for (int xi = 0; xi < 16; ++xi) {
            const float* dmx = dm + xi * m_step;
            const float* vx = v + xi * xi_step;
            float* gx = grad + xi * channels * padded_out_;
            for (int64_t co0 = 0; co0 < padded_out_; co0 += (wide ? 2 : 1) * kLanes) {
              for (int64_t c = 0; c < channels; c += 8) {
                const float* src[8];
                const int count = static_cast<int>(std::min<int64_t>(8, channels - c));
                for (int k = 0; k < count; ++k) src[k] = vx + (c + k) * p.tile_stride;
                WinogradGradTiles(wide, count, src, dmx, tiles, padded_out_, co0,
                                  gx + c * padded_out_);
              }
            }
          }
        }
      }
    }
  });
  // dL/dg = G^T (dL/dU) G, in double from the two halves' float sum.
  for (int64_t co = 0; co < s.out_channels; ++co) {
    for (int64_t c = 0; c < channels; ++c) {
      double t[4][3];  // (dL/dU) G
      for (int i = 0; i < 4; ++i) {
        double u[4];
        for (int j = 0; j < 4; ++j) {
          const int64_t at = ((i * 4 + j) * channels + c) * padded_out_ + co;
          u[j] = static_cast<double>(halves[at] + halves[grad_size + at]);
        }
        t[i][0] = u[0] + 0.5 * (u[1] + u[2]);
        t[i][1] = 0.5 * (u[1] - u[2]);
        t[i][2] = 0.5 * (u[1] + u[2]) + u[3];
      }
      float* g = weight_grad + (co * channels + c) * 9;
      for (int j = 0; j < 3; ++j) {
        g[j] += static_cast<float>(t[0][j] + 0.5 * (t[1][j] + t[2][j]));
        g[3 + j] += static_cast<float>(0.5 * (t[1][j] - t[2][j]));
        g[6 + j] += static_cast<float>(0.5 * (t[1][j] + t[2][j]) + t[3][j]);
      }
    }
  }
}

void DirectConvolution::PhaseInputGradient(const float* dy, int64_t n, const float* weight,
                                           float* dx) const {
  const Shape& sh = shape_;
  const Planes& f = forward_;
  const int64_t s = sh.stride, taps = sh.kernel * sh.kernel;
  // Every phase's packed weights, one after another: row (co, a, b), column c.
  float* packed = Scratch(kPacked, phase_rows_ * padded_in_);
  std::memset(packed, 0, sizeof(float) * phase_rows_ * padded_in_);
  for (const GradientPhase& ph : phases_) {
    for (size_t i = 0; i < ph.tap.size(); ++i) {
      float* row = packed + (ph.first_row + static_cast<int64_t>(i)) * padded_in_;
      for (int64_t c = 0; c < sh.in_channels; ++c) row[c] = weight[ph.tap[i] + c * taps];
    }
  }
  const int64_t dy_plane = f.h_out * f.w_out;
  const int64_t dx_sample = sh.in_channels * sh.h * sh.w;
  const int64_t work = n * sh.out_channels * sh.in_channels * taps * f.h_out * f.w_out;
  SplitInTwo(n, 1, work, [&](int64_t begin, int64_t end) {
    float* in = Scratch(kPrepared, sh.out_channels * phase_stride_);
    float* out_t = Scratch(kTransposed, phase_positions_ * padded_in_ + kLanes * sh.in_channels);
    float* block = out_t + phase_positions_ * padded_in_;  // (C_in, kLanes) of one row
    for (int64_t i = begin; i < end; ++i) {
      // dy into planes of phase_plane_w columns, `lead` zero rows and columns before it.
      const float* dys = dy + i * sh.out_channels * dy_plane;
      for (int64_t co = 0; co < sh.out_channels; ++co) {
        float* plane = in + co * phase_stride_;
        std::memset(plane, 0, sizeof(float) * phase_stride_);
        for (int64_t oh = 0; oh < f.h_out; ++oh) {
          std::memcpy(plane + (oh + phase_lead_) * phase_plane_w_ + phase_lead_,
                      dys + co * dy_plane + oh * f.w_out, sizeof(float) * f.w_out);
        }
      }
      float* dxs = dx + i * dx_sample;
      for (size_t k = 0; k < phases_.size(); ++k) {
        const GradientPhase& ph = phases_[k];
        const int64_t pairs = static_cast<int64_t>(ph.tap.size());
        if (pairs > 0) {
          RunGenericKernel(ph.pair_offset.data(), pairs, phase_positions_, padded_in_, in,
                           packed + ph.first_row * padded_in_, out_t);
        } else {  // a stride larger than the kernel: these inputs reach no output
          std::memset(out_t, 0, sizeof(float) * phase_positions_ * padded_in_);
        }
        // Phase position (i, j) is padded input (i*s + r, j*s + q), input (.. - padding).
        for (int64_t pi = 0; pi < f.plane_h; ++pi) {
          const int64_t hh = pi * s + ph.r - sh.padding;
          if (hh < 0 || hh >= sh.h) continue;
          // Columns j with 0 <= j*s + q - padding < w.
          const int64_t j_lo = std::max<int64_t>(0, (sh.padding - ph.q + s - 1) / s);
          const int64_t j_hi = std::min(f.plane_w, (sh.w + sh.padding - ph.q + s - 1) / s);
          for (int64_t j0 = j_lo; j0 < j_hi; j0 += kLanes) {
            const int64_t count = std::min<int64_t>(kLanes, j_hi - j0);
            TransposeRows(out_t + (pi * phase_plane_w_ + j0) * padded_in_, padded_in_, count,
                          sh.in_channels, nullptr, block, kLanes);
            const int64_t ww0 = j0 * s + ph.q - sh.padding;
            for (int64_t c = 0; c < sh.in_channels; ++c) {
              float* d = dxs + (c * sh.h + hh) * sh.w + ww0;
              const float* b = block + c * kLanes;
              for (int64_t q = 0; q < count; ++q) d[q * s] = b[q];
            }
          }
        }
      }
    }
  });
}

}  // namespace normd
