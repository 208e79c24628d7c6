// DirectConvolution: the fast path of Conv2d for groups = 1 and kernels larger than 1x1, a direct
// convolution on register tiles instead of im2col + GEMM.
//
// Why not a BLAS product: for the convolutions BatchNorm networks are built from (16-64 output
// channels, 3x3 kernels, 8x8 to 32x32 planes) the im2col matrix is tall and thin, OpenBLAS
// reaches 40-45 % of this machine's FMA peak on those shapes, and the columns cost a write and a
// read of 9x the input. Why not oneDNN (Debian 12 packages 2.6, libdnnl-dev): Debian's build
// threads with OpenMP, whose pool is per process and spins (core/threads.h says what that
// costs on shared cores), its backward-weights reductions depend on the thread count, and normd
// promises the same bits at every compute budget. So the kernels are written here, with GCC's
// vector extensions rather than intrinsics, so any x86-64 (or other) build compiles them.
//
// How it works. Each sample's input is copied once into zero-padded planes whose rows are
// `plane_w` wide; for stride s the padded plane is split into s*s phase planes (rows i*s+r,
// columns j*s+q), so every convolution reads each tap at a constant offset from the output
// position: output (oh, ow) is numbered o = oh * plane_w + ow, and tap (ki, kj) of input channel
// c reads the prepared input at c * channel_stride + o + offset(ki, kj). Positions with
// ow >= w_out are computed and dropped. The kernels keep a tile of outputs in vector registers:
// a vector of 16 (AVX-512; 8 with AVX, 4 otherwise) output channels for each of P consecutive
// positions; every input value is broadcast once and multiplied with the packed weight vectors
// of all the taps that read it (for a 3x3 kernel with stride 1 one broadcast feeds three
// taps). The weight gradient is the same walk with the roles of output and weights swapped:
// vectors of output channels of dy, broadcast inputs, one accumulator per (channel, tap).
// The input gradient of a stride-1 convolution with padding <= kernel-1 is the forward kernel
// run on dy with the kernel flipped and its channel axes swapped; for other shapes each phase
// (r, q) of the padded input (rows i*s + r, columns j*s + q) is a stride-1 correlation of dy
// with the taps that reach it (ki = r + a*s, kj = q + b*s), computed by the same tiles.
//
// Planar passes. A stride-1 convolution from at most 4 input channels (the 3-channel stems)
// runs forward on tiles of output channels x consecutive output columns instead, reading the
// padded input rows and writing y in place, because with so few input channels the copy and
// transpose around the channel tiles cost as much as the arithmetic; its 3x3 weight gradient
// likewise multiplies vectors of dy's positions by the input under each tap, in dy's layout.
//
// Winograd. Stride-1 3x3 passes that sum at least 32 channels into at least 32 (forward, the
// input gradient as the forward of the flipped kernel, and the weight gradient) use Winograd's
// F(2x2, 3x3) instead: each 2x2 block of outputs comes from the 4x4 input block under it
// through 16 products per channel pair instead of 36. A sample's input is transformed a block
// of about 64 tiles at a time (B^T d B, in registers, 16 tiles a vector), the 16 products are
// sums over channels done by the same register tiles (tiles in place of positions), and
// A^T m A brings them back to outputs; the weights are transformed once per call in double.
// The weight gradient multiplies A dy A^T by the transformed input over the tiles and takes
// G^T (.) G of the sum. Its rounding differs from the direct tiles' (the tests hold both to the
// definition in double, and the parity suite to PyTorch); fewer channels stay on the direct
// tiles, which run them faster (see kWinogradMinChannels).
//
// Results: every output element sums its input channels in order and, per channel, its taps in
// one fixed order, whatever the tile or the thread; the weight gradient sums a sample's
// positions (or tiles) in lanes and the batch in two fixed halves, so a budget of 2 gives the
// bits of a budget of 1.
//
// Thread safety: all methods are const and may run concurrently; scratch memory is per thread
// and grows to the largest layer once.
#ifndef NORMD_CORE_CONV2D_DIRECT_H_
#define NORMD_CORE_CONV2D_DIRECT_H_

#include <cstdint>
#include <vector>

namespace normd {

class DirectConvolution {
 public:
  struct Shape {
    int64_t in_channels = 0, out_channels = 0;
    int64_t h = 0, w = 0;  // input plane
    int64_t kernel = 1, stride = 1, padding = 0;
    // Whether stride-1 3x3 passes use Winograd's F(2x2, 3x3) (see the file comment): where it
    // pays (kAuto: 32 or more channels into 32 or more), always, or never. The last two are for
    // comparing the two (kernels_bench's ConvKernel benchmarks).
    enum class Winograd { kAuto, kAlways, kNever };
    Winograd winograd = Winograd::kAuto;
  };

  DirectConvolution() = default;
  // REQUIRES: the sizes are valid and the output non-empty (Conv2d::Build checks).
  explicit DirectConvolution(const Shape& shape);

  // y (n, C_out, H_out, W_out) = conv(x (n, C_in, H, W), weight (C_out, C_in, k, k)) + bias
  // (bias may be null).
  void Forward(const float* x, int64_t n, const float* weight, const float* bias,
               float* y) const;
  // weight_grad (C_out, C_in, k, k) += dL/dweight for dy (n, C_out, H_out, W_out).
  void AccumulateWeightGradient(const float* x, const float* dy, int64_t n,
                                float* weight_grad) const;
  // dx (n, C_in, H, W) = dL/dx.
  void InputGradient(const float* dy, int64_t n, const float* weight, float* dx) const;

 private:
  // Where a strided input's columns go: those of one column phase start at input column
  // `first`, every stride-th, `count` of them, to `offset` in a row of phase planes.
  struct ColumnPhase {
    int64_t first = 0, count = 0, offset = 0;
  };
  // A convolution's input as the kernels read it (see the file comment).
  struct Planes {
    int64_t channels = 0, h = 0, w = 0, kernel = 1, stride = 1, padding = 0;
    int64_t h_out = 0, w_out = 0;
    int64_t plane_h = 0, plane_w = 0;   // one phase plane
    int64_t positions = 0;              // h_out * plane_w rounded up to whole tiles
    int64_t channel_stride = 0;         // floats between two channels' prepared planes
    std::vector<int64_t> tap_offset;    // kernel * kernel offsets, tap (ki, kj) at ki*k + kj
    std::vector<int64_t> pair_offset;   // channel c, tap t at c * taps + t: c * stride + offset
    std::vector<ColumnPhase> column_phases;  // stride > 1: one per column phase
  };
  static Planes MakePlanes(int64_t channels, int64_t h, int64_t w, int64_t kernel,
                           int64_t stride, int64_t padding);
  static void Prepare(const Planes& p, const float* x, float* out);

  // out_T (positions, padded_out) = the convolution of prepared input `in` with packed weights
  // (channels * taps rows of padded_out floats).
  void RunForwardKernel(const Planes& p, int64_t padded_out, const float* in,
                        const float* packed, float* out_t) const;
  // For each of n samples of `in` (p.channels, p.h, p.w): prepare, run the kernel, and write
  // `out` (out_channels, p.h_out, p.w_out) plus bias (may be null); samples split over two cores.
  void ConvolveSamples(const Planes& p, const float* in, int64_t n, const float* packed,
                       int64_t padded_out, int64_t out_channels, const float* bias,
                       float* out) const;

  // The input gradient of the other shapes (stride > 1, or padding > kernel - 1), one phase
  // (r, q) of the padded input at a time: rows i*s + r, columns j*s + q of the padded input
  // receive dy through the taps ki = r + a*s, kj = q + b*s only, a stride-1 correlation of dy
  // (padded by `lead` rows and columns before it) with those taps.
  struct GradientPhase {
    int64_t r = 0, q = 0;
    std::vector<int64_t> pair_offset;  // per (co, a, b): where it reads the prepared dy
    std::vector<int64_t> tap;          // per (co, a, b): co * C_in * taps + ki * k + kj
    int64_t first_row = 0;             // its first row in the packed weights of all phases
  };
  void PhaseInputGradient(const float* dy, int64_t n, const float* weight, float* dx) const;
  void MakeGradientPhases();

  // A stride-1 3x3 pass by Winograd's F(2x2, 3x3): `channels` summed into `outputs`, over an
  // input plane h x w padded by `padding` zeros on every side.
  struct WinogradPlan {
    int64_t channels = 0;  // 0: the pass does not use Winograd
    int64_t outputs = 0;
    int64_t h = 0, w = 0, padding = 0, h_out = 0, w_out = 0;
    int64_t tiles_h = 0, tiles_w = 0;  // 2x2 output tiles down and across
    int64_t block_rows = 0;            // tile rows transformed and multiplied together
    int64_t positions = 0;             // a block's tiles rounded up to whole register tiles
    int64_t tile_stride = 0;           // floats between two channels of a block's input
    int64_t plane_h = 0, plane_w = 0;  // the zero-padded input plane, 2 * tiles + 2 each way
    int64_t plane_stride = 0;          // floats between two channels' planes
    int64_t padded_out = 0;            // outputs rounded up to whole vectors
    // Floats between two xi of a block's transformed input (xi_step) and of its products or
    // transformed output gradients (product_step).
    int64_t xi_step = 0, product_step = 0;
    std::vector<int64_t> pair_offset;  // channel c at c * tile_stride
  };
  static WinogradPlan MakeWinogradPlan(int64_t channels, int64_t outputs, int64_t h, int64_t w,
                                       int64_t padding);
  // One sample x (p.channels, p.h, p.w) into its zero-padded planes (p.plane_stride floats
  // apart), whose padding the caller zeroed once.
  static void PrepareWinogradPlanes(const WinogradPlan& p, const float* x, float* planes);
  // B^T d B of tile rows [ti0, ti0 + rows): v[xi * p.xi_step + c * p.tile_stride + tile],
  // tiles numbered from the block's first.
  static void WinogradInputBlock(const WinogradPlan& p, const float* planes, int64_t ti0,
                                 int64_t rows, float* v);
  // out (n, p.outputs, p.h_out, p.w_out) = the pass over in (n, p.channels, p.h, p.w) with
  // transformed weights `packed` (16 x p.channels rows of p.padded_out floats), plus bias
  // (may be null); samples split over two cores.
  void WinogradSamples(const WinogradPlan& p, const float* in, int64_t n, const float* packed,
                       const float* bias, float* out) const;

  // The planar passes of a stride-1 convolution from at most 4 input channels (the stems):
  // forward on tiles of output channels x consecutive output columns, in y's own layout, and
  // (3x3 only) the weight gradient (see conv2d_direct.cc). The input gradient keeps the tiles.
  struct PlanarPlan {
    bool active = false;
    bool wide = false;         // two vectors of output columns per tile (w_out >= 2 vectors)
    int64_t h_out = 0, w_out = 0;
    int64_t pw = 0;            // floats per padded input row
    int64_t plane_size = 0;    // floats per padded input plane
    int64_t dyw = 0;           // floats per row of dy as the weight gradient reads it
  };
  // One sample x into the padded planes, whose padding the caller zeroed once.
  void PreparePlanar(const float* x, float* planes) const;
  void PlanarForward(const float* x, int64_t n, const float* weight, const float* bias,
                     float* y) const;
  // The 3x3 weight gradient of the same passes: vectors of positions, one accumulator per
  // (output channel, input channel, tap), lanes summed at the end.
  void PlanarWeightGradient(const float* x, const float* dy, int64_t n,
                            float* weight_grad) const;

  // AccumulateWeightGradient of a pass that runs forward by Winograd.
  void WinogradWeightGradient(const float* x, const float* dy, int64_t n,
                              float* weight_grad) const;

  Shape shape_;
  Planes forward_;
  WinogradPlan winograd_forward_;
  WinogradPlan winograd_input_grad_;
  PlanarPlan planar_;
  Planes input_grad_;  // dy as the stride-1 input gradient reads it; channels 0: phases instead
  std::vector<GradientPhase> phases_;
  int64_t phase_lead_ = 0;       // zero rows and columns before dy in its prepared planes
  int64_t phase_plane_w_ = 0;    // row length of the prepared dy and of the phase outputs
  int64_t phase_positions_ = 0;  // output positions of one phase, rounded up to whole tiles
  int64_t phase_stride_ = 0;     // floats between two channels of the prepared dy
  int64_t phase_rows_ = 0;       // packed weight rows of all phases
  int64_t padded_out_ = 0;  // C_out rounded up to whole vectors
  int64_t padded_in_ = 0;   // C_in rounded up to whole vectors
};

}  // namespace normd

#endif  // NORMD_CORE_CONV2D_DIRECT_H_
