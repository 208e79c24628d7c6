// normd_kernels_bench: Google Benchmark micro-benchmarks of normd's core kernels.
//
// Before the benchmarks run, main() calibrates two ceilings in this same process (in the
// calibrating thread's CPU time, see Calibration below):
//  - memcpy bandwidth for each BatchNorm tensor size (best of several runs; a memcpy of S bytes
//    moves 2*S bytes: S read, S written), and
//  - the single-core FMA peak (independent fused multiply-adds on the widest vectors the build
//    targets).
// BatchNorm benchmarks then report GB/s and `frac_memcpy` (their bandwidth over memcpy's for
// the same tensor size); Linear and Conv2d report GFLOP/s and `frac_peak`.
//
// Bytes a BatchNorm must move, in units of one tensor (N*C*S floats):
//   forward (training)        3: read x for the statistics, read x and write y to normalise;
//   forward + backward        8: the forward's 3, then read x and dy for the two reductions,
//                               read x and dy and write dx for the input gradient.
// (One statistics pass is the floor; normd's two-pass statistics read x once more, which the
// count deliberately does not credit.)
//
// Kernels run on one thread; BatchNorm and the whole TrainStep also at a compute-thread budget
// of 2 (work split across two cores when the second is idle, core/threads.h).
//
// The convolution layers of issue 13's networks (cnn_bench.py drives them):
//  - ConvLayer/<net>/<shape>/<pass>/<T>t: one Conv2d layer of the CNN (batch 64 and 256) or of
//    ResNet-20 (batch 128) at compute budget T (1 or 2). Passes: `fwd`; `bwd_dx`, the input
//    gradient alone (the layer made untrainable, so Backward skips the weight gradient);
//    `bwd_dw`, the weight and bias gradients alone (Backward with dx == nullptr). Each pass
//    counts 2*N*C_out*(C_in/groups)*k*k*H_out*W_out FLOP; frac_peak is against T times the
//    calibrated single-core peak. <shape> is CinxHxW-Cout-kKsS (e.g. 32x16x16-64-k3s2).
//  - BnRelu/<net>/<shape>/<op>/<T>t: the BatchNorm2d (training, running statistics updated)
//    and ReLU that follow such a convolution, on its output shape CxHxW at the network's batch;
//    `fwd` and `fwd_bwd`. Bytes, in tensors of N*C*H*W floats: the same 3 and 8 as BatchNorm
//    alone, because that is the floor of the fused pair: ReLU's mask follows from x and the
//    statistics (gamma*xhat + beta > 0), so neither direction needs another tensor. The pair
//    runs as a network runs it, through ForwardLayers / BackwardLayers, which fuse it
//    (BatchNorm::ForwardWithRelu); run as two layers it would move 2 (fwd) and 3 (bwd) more,
//    which the count deliberately does not credit. frac_memcpy is against a one-thread memcpy
//    of one tensor's size at either budget.
// Both report `splits`, the two-core splits per iteration (ReportSplits).
//  - ConvKernel/<net>/<shape>/<pass>/{winograd,direct}: DirectConvolution alone on each
//    stride-1 3x3 layer at budget 1, with Winograd's F(2x2, 3x3) forced on or off (the layer
//    itself picks one by its channel counts); FLOP counted as ConvLayer's.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__) || defined(__SSE2__)
#include <immintrin.h>
#endif

#include "bench/reference_models.h"
#include "core/conv2d_direct.h"
#include "core/layer.h"
#include "core/model.h"
#include "core/rng.h"
#include "core/tensor.h"
#include "core/threads.h"

namespace normd {
namespace bench {
namespace {

using Clock = std::chrono::steady_clock;

// ---- Calibration -------------------------------------------------------------------------
//
// Both ceilings are timed in the calibrating thread's CPU time, not wall time: on a machine
// shared with other jobs, a wall-clock ceiling falls with the share of the core this thread
// gets (half of it under a load of 4 on 2 cores), which would inflate every fraction of it.
// The hardware's ceiling is what the thread reaches while it runs.

double ThreadCpuSeconds() {
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}

// memcpy bandwidth (bytes moved per second, read + write) for copies of `bytes` bytes.
double MeasureMemcpy(size_t bytes) {
  std::vector<char> src(bytes, 1), dst(bytes, 0);
  // Copies between clock reads: reading a thread's CPU clock is a system call, which must not
  // weigh on copies of a few kilobytes.
  const int batch = static_cast<int>(std::max<size_t>(1, (size_t{4} << 20) / bytes));
  double best = 0.0;
  for (int rep = 0; rep < 7; ++rep) {
    int iters = 0;
    const double t0 = ThreadCpuSeconds();
    double dt = 0.0;
    do {
      for (int i = 0; i < batch; ++i) {
        std::memcpy(dst.data(), src.data(), bytes);
        benchmark::ClobberMemory();
      }
      iters += batch;
      dt = ThreadCpuSeconds() - t0;
    } while (dt < 0.03);
    best = std::max(best, 2.0 * static_cast<double>(bytes) * iters / dt);
  }
  return best;
}

#if defined(__AVX512F__)
using Vec = __m512;
constexpr int kLanes = 16;
constexpr const char* kIsa = "AVX-512 FMA";
inline Vec VSet(float v) { return _mm512_set1_ps(v); }
inline Vec VFma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline float VFirst(Vec v) { return _mm512_cvtss_f32(v); }
#elif defined(__AVX2__) && defined(__FMA__)
using Vec = __m256;
constexpr int kLanes = 8;
constexpr const char* kIsa = "AVX2 FMA";
inline Vec VSet(float v) { return _mm256_set1_ps(v); }
inline Vec VFma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline float VFirst(Vec v) { return _mm256_cvtss_f32(v); }
#else
using Vec = __m128;
constexpr int kLanes = 4;
constexpr const char* kIsa = "SSE2 mul+add (no FMA in this build)";
inline Vec VSet(float v) { return _mm_set1_ps(v); }
inline Vec VFma(Vec a, Vec b, Vec c) { return _mm_add_ps(_mm_mul_ps(a, b), c); }
inline float VFirst(Vec v) { return _mm_cvtss_f32(v); }
#endif

// FLOP/s of one core issuing independent FMAs (2 FLOP per lane). Twelve chains hide the FMA
// latency on every x86 core with up to two FMA pipes.
double MeasureFmaPeak() {
  constexpr int kChains = 12;
  constexpr long kIters = 4'000'000;
  double best = 0.0;
  float sink = 0.0f;
  for (int rep = 0; rep < 7; ++rep) {
    Vec acc[kChains];
    for (int i = 0; i < kChains; ++i) acc[i] = VSet(1.0f + i);
    const Vec b = VSet(0.999999f), c = VSet(1e-7f);
    const double t0 = ThreadCpuSeconds();
    for (long it = 0; it < kIters; ++it) {
#pragma GCC unroll 12
      for (int i = 0; i < kChains; ++i) acc[i] = VFma(acc[i], b, c);
    }
    const double dt = ThreadCpuSeconds() - t0;
    for (int i = 0; i < kChains; ++i) sink += VFirst(acc[i]);
    best = std::max(best, 2.0 * kLanes * kChains * static_cast<double>(kIters) / dt);
  }
  benchmark::DoNotOptimize(sink);
  return best;
}

double g_fma_peak = 0.0;                   // FLOP/s
std::map<size_t, double> g_memcpy_bw;      // tensor bytes -> bytes/s

// ---- Helpers -----------------------------------------------------------------------------

void FillUniform(Tensor* t, uint64_t seed) {
  Rng rng(seed);
  for (int64_t i = 0; i < t->size(); ++i) t->data()[i] = rng.Uniform(-1.0f, 1.0f) * 2.0f + 0.5f;
}

// A built and allocated layer for per-sample input `sample`.
std::unique_ptr<Layer> BuildLayer(const LayerConfig& config, const Shape& sample) {
  std::unique_ptr<Layer> layer = MakeLayer(config);
  Shape out;
  Status s = layer->Build(sample, &out);
  if (!s.ok()) {
    std::fprintf(stderr, "kernels_bench: %s\n", s.message().c_str());
    std::abort();
  }
  Rng rng(7);
  layer->Allocate(rng);
  return layer;
}

void ReportBandwidth(benchmark::State& state, double tensor_bytes, double tensors_moved) {
  const double bytes = tensor_bytes * tensors_moved * static_cast<double>(state.iterations());
  state.counters["GB/s"] = benchmark::Counter(bytes / 1e9, benchmark::Counter::kIsRate);
  auto it = g_memcpy_bw.find(static_cast<size_t>(tensor_bytes));
  if (it != g_memcpy_bw.end()) {
    state.counters["frac_memcpy"] =
        benchmark::Counter(bytes / it->second, benchmark::Counter::kIsRate);
  }
}

// frac_peak is against `cores` times the single-core peak (the cores the budget may use).
void ReportFlops(benchmark::State& state, double flops_per_iter, int cores = 1) {
  const double flops = flops_per_iter * static_cast<double>(state.iterations());
  state.counters["GFLOP/s"] = benchmark::Counter(flops / 1e9, benchmark::Counter::kIsRate);
  if (g_fma_peak > 0.0) {
    state.counters["frac_peak"] =
        benchmark::Counter(flops / (cores * g_fma_peak), benchmark::Counter::kIsRate);
  }
}

// `splits`: SplitInTwo calls per iteration that ran on two cores since SplitsDone() was
// `before` (0 at budget 1; at budget 2 it tells a split that happened from one the helper
// declined because the second core was busy with other processes).
void ReportSplits(benchmark::State& state, int64_t before) {
  state.counters["splits"] = static_cast<double>(internal::SplitsDone() - before) /
                             static_cast<double>(std::max<int64_t>(1, state.iterations()));
}

// ---- BatchNorm -----------------------------------------------------------------------------

// Shape args: N, C, then H, W for BatchNorm2d (both absent for BatchNorm1d on (N, C)).
Shape BnSample(const benchmark::State& state, bool two_d) {
  return two_d ? Shape{state.range(1), state.range(2), state.range(3)} : Shape{state.range(1)};
}

void BM_BatchNorm(benchmark::State& state, bool two_d, bool backward, int threads) {
  ScopedComputeThreads budget(threads);
  const Shape sample = BnSample(state, two_d);
  LayerConfig config;
  config.kind = two_d ? LayerKind::kBatchNorm2d : LayerKind::kBatchNorm1d;
  config.batch_norm.num_features = state.range(1);
  std::unique_ptr<Layer> bn = BuildLayer(config, sample);
  Tensor x(sample.WithBatch(state.range(0))), y, dy(x.shape()), dx;
  FillUniform(&x, 1);
  FillUniform(&dy, 2);
  LayerCache cache;
  ForwardContext ctx;
  ctx.training = true;
  ctx.update_running_stats = true;
  auto run = [&] {
    bn->Forward(x.view(), &y, &cache, ctx);
    bn->AsBatchNorm()->Commit(&cache);
    if (backward) bn->Backward(x.view(), y, dy.view(), cache, ctx, &dx);
    benchmark::DoNotOptimize(y.data());
    benchmark::DoNotOptimize(dx.data());
  };
  run();  // untimed: the outputs' first allocation and page faults
  for (auto _ : state) run();
  const double tensor_bytes = static_cast<double>(x.size()) * sizeof(float);
  ReportBandwidth(state, tensor_bytes, backward ? 8.0 : 3.0);
  state.SetItemsProcessed(state.iterations() * state.range(0));
}

void BM_Memcpy(benchmark::State& state) {
  const size_t bytes = static_cast<size_t>(state.range(0));
  std::vector<char> src(bytes, 1), dst(bytes, 0);
  for (auto _ : state) {
    std::memcpy(dst.data(), src.data(), bytes);
    benchmark::ClobberMemory();
  }
  state.counters["GB/s"] = benchmark::Counter(
      2.0 * bytes * static_cast<double>(state.iterations()) / 1e9, benchmark::Counter::kIsRate);
}

// ---- Linear and Conv2d ---------------------------------------------------------------------

void BM_Linear(benchmark::State& state, bool backward) {
  ScopedComputeThreads threads(1);
  const int64_t n = state.range(0), in = state.range(1), out = state.range(2);
  std::unique_ptr<Layer> linear = BuildLayer(LinearLayer(in, out), Shape{in});
  Tensor x(Shape{n, in}), y, dy(Shape{n, out}), dx;
  FillUniform(&x, 1);
  FillUniform(&dy, 2);
  LayerCache cache;
  ForwardContext ctx;
  ctx.training = true;
  for (auto _ : state) {
    linear->Forward(x.view(), &y, &cache, ctx);
    if (backward) linear->Backward(x.view(), y, dy.view(), cache, ctx, &dx);
    benchmark::DoNotOptimize(y.data());
    benchmark::DoNotOptimize(dx.data());
  }
  // Forward: one GEMM; backward: dW += dy^T x and dx = dy W, two more of the same size.
  const double gemm = 2.0 * n * in * out;
  ReportFlops(state, backward ? 3.0 * gemm : gemm);
  state.SetItemsProcessed(state.iterations() * n);
}

Conv2dConfig ConvConfig(int64_t cin, int64_t cout, int64_t k, int64_t stride, int64_t pad) {
  Conv2dConfig c;
  c.in_channels = cin;
  c.out_channels = cout;
  c.kernel_size = k;
  c.stride = stride;
  c.padding = pad;
  return c;
}

// FLOP of one pass (forward, input gradient or weight gradient) of a convolution with output y:
// one multiply-add per weight tap and output element.
double ConvPassFlops(const Conv2dConfig& c, const Tensor& y) {
  const Shape& s = y.shape();  // (N, C_out, H_out, W_out)
  return 2.0 * static_cast<double>(s[0]) * static_cast<double>(c.out_channels) *
         static_cast<double>(c.in_channels / c.groups) *
         static_cast<double>(c.kernel_size * c.kernel_size) * static_cast<double>(s[2]) *
         static_cast<double>(s[3]);
}

std::unique_ptr<Layer> BuildConv(const Conv2dConfig& c, int64_t h, int64_t w) {
  LayerConfig config;
  config.kind = LayerKind::kConv2d;
  config.conv2d = c;
  return BuildLayer(config, Shape{c.in_channels, h, w});
}

// Args: N, C_in, H, W, C_out, k, stride, padding.
void BM_Conv2d(benchmark::State& state, bool backward) {
  ScopedComputeThreads threads(1);
  const int64_t n = state.range(0), cin = state.range(1), h = state.range(2), w = state.range(3);
  const Conv2dConfig c =
      ConvConfig(cin, state.range(4), state.range(5), state.range(6), state.range(7));
  std::unique_ptr<Layer> conv = BuildConv(c, h, w);
  Tensor x(Shape{n, cin, h, w}), y;
  FillUniform(&x, 1);
  LayerCache cache;
  ForwardContext ctx;
  ctx.training = true;
  conv->Forward(x.view(), &y, &cache, ctx);
  Tensor dy(y.shape()), dx;
  FillUniform(&dy, 2);
  for (auto _ : state) {
    conv->Forward(x.view(), &y, &cache, ctx);
    if (backward) conv->Backward(x.view(), y, dy.view(), cache, ctx, &dx);
    benchmark::DoNotOptimize(y.data());
    benchmark::DoNotOptimize(dx.data());
  }
  // Forward, then the input and the weight gradients: three passes of the same FLOP count.
  const double pass = ConvPassFlops(c, y);
  ReportFlops(state, backward ? 3.0 * pass : pass);
  state.SetItemsProcessed(state.iterations() * n);
}

// ---- The layers of issue 13's CNNs -----------------------------------------------------------

// One convolution of a benchmarked network, at that network's batch size.
struct NetConv {
  const char* net;  // "cnn_b64", "cnn_b256", "resnet20_b128"
  int64_t n, cin, h, w, cout, k, stride, pad;
};

enum class ConvPass { kForward, kInputGrad, kWeightGrad };

void BM_ConvLayer(benchmark::State& state, NetConv nc, ConvPass pass, int threads) {
  ScopedComputeThreads budget(threads);
  const Conv2dConfig c = ConvConfig(nc.cin, nc.cout, nc.k, nc.stride, nc.pad);
  std::unique_ptr<Layer> conv = BuildConv(c, nc.h, nc.w);
  // Input gradient alone: an untrainable layer's Backward skips the parameter gradients
  // (Layer::set_trainable); weight gradient alone: Backward with dx == nullptr.
  if (pass == ConvPass::kInputGrad) conv->set_trainable(false);
  Tensor x(Shape{nc.n, nc.cin, nc.h, nc.w}), y;
  FillUniform(&x, 1);
  LayerCache cache;
  ForwardContext ctx;
  ctx.training = true;
  conv->Forward(x.view(), &y, &cache, ctx);
  Tensor dy(y.shape()), dx;
  FillUniform(&dy, 2);
  // One untimed pass first: Google Benchmark may time a single iteration of a slow layer, which
  // must not include dx's first allocation and page faults.
  auto run = [&] {
    switch (pass) {
      case ConvPass::kForward:
        conv->Forward(x.view(), &y, &cache, ctx);
        benchmark::DoNotOptimize(y.data());
        break;
      case ConvPass::kInputGrad:
        conv->Backward(x.view(), y, dy.view(), cache, ctx, &dx);
        benchmark::DoNotOptimize(dx.data());
        break;
      case ConvPass::kWeightGrad:
        conv->Backward(x.view(), y, dy.view(), cache, ctx, nullptr);
        benchmark::DoNotOptimize(conv->parameters()[0]->grad.data());
        break;
    }
  };
  run();
  const int64_t splits = internal::SplitsDone();
  for (auto _ : state) run();
  ReportFlops(state, ConvPassFlops(c, y), threads);
  ReportSplits(state, splits);
  state.SetItemsProcessed(state.iterations() * nc.n);
}

// DirectConvolution alone on a network's stride-1 3x3 layer, with Winograd always or never, at
// budget 1: the comparison behind kWinogradMinChannels (core/conv2d_direct.cc). The same FLOP
// count as ConvLayer (a direct convolution's multiply-adds) either way.
void BM_ConvKernel(benchmark::State& state, NetConv nc, ConvPass pass, bool winograd) {
  ScopedComputeThreads budget(1);
  using Shape2d = DirectConvolution::Shape;
  Shape2d shape{nc.cin, nc.cout, nc.h, nc.w, nc.k, nc.stride, nc.pad};
  shape.winograd = winograd ? Shape2d::Winograd::kAlways : Shape2d::Winograd::kNever;
  const DirectConvolution conv(shape);
  const int64_t h_out = (nc.h + 2 * nc.pad - nc.k) / nc.stride + 1;
  const int64_t w_out = (nc.w + 2 * nc.pad - nc.k) / nc.stride + 1;
  Tensor x(Shape{nc.n, nc.cin, nc.h, nc.w}), weight(Shape{nc.cout, nc.cin, nc.k, nc.k});
  Tensor y(Shape{nc.n, nc.cout, h_out, w_out}), dy(y.shape()), dx(x.shape());
  Tensor weight_grad(weight.shape(), 0.0f);
  FillUniform(&x, 1);
  FillUniform(&weight, 3);
  FillUniform(&dy, 2);
  auto run = [&] {
    switch (pass) {
      case ConvPass::kForward:
        conv.Forward(x.data(), nc.n, weight.data(), nullptr, y.data());
        benchmark::DoNotOptimize(y.data());
        break;
      case ConvPass::kInputGrad:
        conv.InputGradient(dy.data(), nc.n, weight.data(), dx.data());
        benchmark::DoNotOptimize(dx.data());
        break;
      case ConvPass::kWeightGrad:
        conv.AccumulateWeightGradient(x.data(), dy.data(), nc.n, weight_grad.data());
        benchmark::DoNotOptimize(weight_grad.data());
        break;
    }
  };
  run();  // untimed: scratch grows to this layer's size
  for (auto _ : state) run();
  ReportFlops(state, ConvPassFlops(ConvConfig(nc.cin, nc.cout, nc.k, nc.stride, nc.pad), y));
  state.SetItemsProcessed(state.iterations() * nc.n);
}

// BatchNorm2d (training) then ReLU on (N, C, H, W), forward or forward and backward.
void BM_BnRelu(benchmark::State& state, std::vector<int64_t> shape, bool backward, int threads) {
  ScopedComputeThreads budget(threads);
  const Shape sample{shape[1], shape[2], shape[3]};
  LayerConfig bn_config;
  bn_config.kind = LayerKind::kBatchNorm2d;
  bn_config.batch_norm.num_features = shape[1];
  LayerList pair;
  pair.push_back(BuildLayer(bn_config, sample));
  pair.push_back(BuildLayer(ReluLayer(), sample));
  Tensor x(sample.WithBatch(shape[0])), dz(x.shape()), dx, buf_a, buf_b;
  FillUniform(&x, 1);
  FillUniform(&dz, 2);
  Tensor outputs[2];
  LayerCache caches[2];
  ForwardContext ctx;
  ctx.training = true;
  ctx.update_running_stats = true;
  auto run = [&] {
    ForwardLayers(pair, x.view(), ctx, outputs, caches);
    pair[0]->AsBatchNorm()->Commit(&caches[0]);
    if (backward) {
      BackwardLayers(pair, x.view(), outputs, caches, dz.view(), ctx, &dx, &buf_a, &buf_b);
    }
    benchmark::DoNotOptimize(outputs[1].data());
    benchmark::DoNotOptimize(dx.data());
  };
  run();  // untimed: the outputs' first allocation and page faults
  const int64_t splits = internal::SplitsDone();
  for (auto _ : state) run();
  ReportBandwidth(state, static_cast<double>(x.size()) * sizeof(float), backward ? 8.0 : 3.0);
  ReportSplits(state, splits);
  state.SetItemsProcessed(state.iterations() * shape[0]);
}

// The convolutions of issue 13's networks (3x3 unless k says otherwise).
//  - The CNN: 4 x (Conv3x3 pad 1, BatchNorm2d, ReLU), channels 32, 32, 64, 64 on 3x32x32, a
//    2x2 max-pool after the second and the fourth block; at batch 64 and 256.
//  - ResNet-20: stem 3->16, stages of BasicBlocks at 16, 32, 64 channels (32x32, 16x16, 8x8),
//    the first conv of stages 2 and 3 with stride 2 and a 1x1 stride-2 projection shortcut;
//    batch 128. Each distinct layer shape once.
std::vector<NetConv> NetConvs() {
  std::vector<NetConv> out;
  for (int64_t n : {64, 256}) {
    const char* net = n == 64 ? "cnn_b64" : "cnn_b256";
    out.push_back({net, n, 3, 32, 32, 32, 3, 1, 1});
    out.push_back({net, n, 32, 32, 32, 32, 3, 1, 1});
    out.push_back({net, n, 32, 16, 16, 64, 3, 1, 1});
    out.push_back({net, n, 64, 16, 16, 64, 3, 1, 1});
  }
  const char* r = "resnet20_b128";
  out.push_back({r, 128, 3, 32, 32, 16, 3, 1, 1});
  out.push_back({r, 128, 16, 32, 32, 16, 3, 1, 1});
  out.push_back({r, 128, 16, 32, 32, 32, 3, 2, 1});
  out.push_back({r, 128, 32, 16, 16, 32, 3, 1, 1});
  out.push_back({r, 128, 32, 16, 16, 64, 3, 2, 1});
  out.push_back({r, 128, 64, 8, 8, 64, 3, 1, 1});
  out.push_back({r, 128, 16, 32, 32, 32, 1, 2, 0});  // projection shortcuts
  out.push_back({r, 128, 32, 16, 16, 64, 1, 2, 0});
  return out;
}

std::string ConvName(const NetConv& c) {
  return std::to_string(c.cin) + "x" + std::to_string(c.h) + "x" + std::to_string(c.w) + "-" +
         std::to_string(c.cout) + "-k" + std::to_string(c.k) + "s" + std::to_string(c.stride);
}

// The distinct (net, N, C, H, W) outputs of NetConvs' 3x3 convolutions, where a BatchNorm2d
// and (but for the last of a ResNet block) a ReLU follow.
std::vector<std::pair<std::string, std::vector<int64_t>>> NetBnShapes() {
  std::vector<std::pair<std::string, std::vector<int64_t>>> out;
  for (const NetConv& c : NetConvs()) {
    if (c.k != 3) continue;
    const int64_t ho = (c.h + 2 * c.pad - c.k) / c.stride + 1;
    const int64_t wo = (c.w + 2 * c.pad - c.k) / c.stride + 1;
    std::pair<std::string, std::vector<int64_t>> e{c.net, {c.n, c.cout, ho, wo}};
    if (std::find(out.begin(), out.end(), e) == out.end()) out.push_back(e);
  }
  return out;
}

// ---- The whole training step -----------------------------------------------------------------

void BM_TrainStep(benchmark::State& state) {
  const int64_t n = state.range(0);
  ScopedComputeThreads threads(static_cast<int>(state.range(1)));
  std::unique_ptr<Model> model;
  Status s = Model::Create(ReferenceMlpConfig(), Sequential::Limits(), &model);
  if (!s.ok()) {
    state.SkipWithError(s.message().c_str());
    return;
  }
  Tensor x(Shape{n, kReferenceIn});
  FillUniform(&x, 3);
  std::vector<int64_t> labels(n);
  Rng rng(4);
  for (int64_t& l : labels) l = static_cast<int64_t>(rng.Next() % kReferenceClasses);
  Targets targets;
  targets.labels = labels.data();
  targets.num_labels = n;
  ForwardRecord rec;
  TrainResult result;
  for (auto _ : state) {
    s = model->TrainStep(x.view(), targets, &rec, &result);
    if (!s.ok()) {
      state.SkipWithError(s.message().c_str());
      return;
    }
  }
  // GEMM FLOPs per step: forward, weight gradients, and input gradients of all but the first.
  const double fwd = 2.0 * n *
                     (kReferenceIn * kReferenceHidden + kReferenceHidden * kReferenceHidden +
                      kReferenceHidden * kReferenceClasses);
  const double dx = 2.0 * n * (kReferenceHidden * kReferenceHidden +
                               kReferenceHidden * kReferenceClasses);
  state.counters["GFLOP/s"] = benchmark::Counter(
      (2.0 * fwd + dx) * static_cast<double>(state.iterations()) / 1e9,
      benchmark::Counter::kIsRate);
  state.SetItemsProcessed(state.iterations() * n);  // items/s = samples/s
}

void BM_FmaPeak(benchmark::State& state) {
  for (auto _ : state) benchmark::DoNotOptimize(g_fma_peak);
  state.counters["GFLOP/s"] = g_fma_peak / 1e9;
  state.SetLabel(kIsa);
}

// The calibrated memcpy bandwidth of one tensor size (so the JSON output carries it).
void BM_MemcpyPeak(benchmark::State& state) {
  const size_t bytes = static_cast<size_t>(state.range(0));
  for (auto _ : state) benchmark::DoNotOptimize(bytes);
  state.counters["GB/s"] = g_memcpy_bw[bytes] / 1e9;
}

// ---- Registration --------------------------------------------------------------------------

const std::vector<std::vector<int64_t>> kBn1dShapes = {{256, 4096}, {32, 512}};
const std::vector<int64_t> kBn2dShape = {64, 64, 32, 32};

void RegisterAll() {
  benchmark::RegisterBenchmark("FmaPeak", BM_FmaPeak)->Iterations(1);
  for (const auto& [bytes, bw] : g_memcpy_bw) {
    benchmark::RegisterBenchmark("MemcpyPeak", BM_MemcpyPeak)
        ->Arg(static_cast<int64_t>(bytes))->Iterations(1);
  }
  // BatchNorm at a budget of 1 ("fwd", "fwd_bwd") and of 2 ("fwd_2t", "fwd_bwd_2t": large
  // layers split their channels across two cores when the second is idle, core/threads.h).
  for (const auto& shape : kBn1dShapes) {
    for (int threads : {1, 2}) {
      const std::string suffix = threads == 1 ? "" : "_2t";
      benchmark::RegisterBenchmark(("BatchNorm1d/fwd" + suffix).c_str(), BM_BatchNorm, false,
                                   false, threads)
          ->Args(shape)->UseRealTime();
      benchmark::RegisterBenchmark(("BatchNorm1d/fwd_bwd" + suffix).c_str(), BM_BatchNorm,
                                   false, true, threads)
          ->Args(shape)->UseRealTime();
    }
    benchmark::RegisterBenchmark("Memcpy", BM_Memcpy)
        ->Arg(shape[0] * shape[1] * sizeof(float))->UseRealTime();
  }
  for (int threads : {1, 2}) {
    const std::string suffix = threads == 1 ? "" : "_2t";
    benchmark::RegisterBenchmark(("BatchNorm2d/fwd" + suffix).c_str(), BM_BatchNorm, true, false,
                                 threads)
        ->Args(kBn2dShape)->UseRealTime();
    benchmark::RegisterBenchmark(("BatchNorm2d/fwd_bwd" + suffix).c_str(), BM_BatchNorm, true,
                                 true, threads)
        ->Args(kBn2dShape)->UseRealTime();
  }
  benchmark::RegisterBenchmark("Memcpy", BM_Memcpy)
      ->Arg(64 * 64 * 32 * 32 * sizeof(float))->UseRealTime();
  benchmark::RegisterBenchmark("Linear/fwd", BM_Linear, false)
      ->Args({256, 784, 512})->UseRealTime();
  benchmark::RegisterBenchmark("Linear/fwd_bwd", BM_Linear, true)
      ->Args({256, 784, 512})->UseRealTime();
  benchmark::RegisterBenchmark("Conv2d/fwd", BM_Conv2d, false)
      ->Args({32, 16, 16, 16, 32, 3, 1, 0})->UseRealTime();
  benchmark::RegisterBenchmark("Conv2d/fwd_bwd", BM_Conv2d, true)
      ->Args({32, 16, 16, 16, 32, 3, 1, 0})->UseRealTime();
  for (const NetConv& c : NetConvs()) {
    for (int threads : {1, 2}) {
      const std::string tail = "/" + std::to_string(threads) + "t";
      const std::string base = std::string("ConvLayer/") + c.net + "/" + ConvName(c) + "/";
      for (const auto& [pass, name] : {std::pair{ConvPass::kForward, "fwd"},
                                       std::pair{ConvPass::kInputGrad, "bwd_dx"},
                                       std::pair{ConvPass::kWeightGrad, "bwd_dw"}}) {
        benchmark::RegisterBenchmark((base + name + tail).c_str(), BM_ConvLayer, c, pass,
                                     threads)
            ->UseRealTime();
      }
    }
  }
  for (const NetConv& c : NetConvs()) {
    if (c.k != 3 || c.stride != 1) continue;
    const std::string base = std::string("ConvKernel/") + c.net + "/" + ConvName(c) + "/";
    for (const auto& [pass, name] : {std::pair{ConvPass::kForward, "fwd"},
                                     std::pair{ConvPass::kInputGrad, "bwd_dx"},
                                     std::pair{ConvPass::kWeightGrad, "bwd_dw"}}) {
      for (const bool winograd : {true, false}) {
        benchmark::RegisterBenchmark(
            (base + name + (winograd ? "/winograd" : "/direct")).c_str(), BM_ConvKernel, c,
            pass, winograd)
            ->UseRealTime();
      }
    }
  }
  for (const auto& [net, shape] : NetBnShapes()) {
    for (int threads : {1, 2}) {
      const std::string base = "BnRelu/" + net + "/" + std::to_string(shape[1]) + "x" +
                               std::to_string(shape[2]) + "x" + std::to_string(shape[3]) + "/";
      const std::string tail = "/" + std::to_string(threads) + "t";
      benchmark::RegisterBenchmark((base + "fwd" + tail).c_str(), BM_BnRelu, shape, false,
                                   threads)
          ->UseRealTime();
      benchmark::RegisterBenchmark((base + "fwd_bwd" + tail).c_str(), BM_BnRelu, shape, true,
                                   threads)
          ->UseRealTime();
    }
  }
  for (int64_t threads : {1, 2}) {
    for (int64_t batch : {32, 256, 1024}) {
      benchmark::RegisterBenchmark("TrainStep/mlp", BM_TrainStep)
          ->Args({batch, threads})->ArgNames({"batch", "threads"})->UseRealTime();
    }
  }
}

void Calibrate() {
  g_fma_peak = MeasureFmaPeak();
  std::vector<size_t> sizes;
  for (const auto& s : kBn1dShapes) sizes.push_back(s[0] * s[1] * sizeof(float));
  sizes.push_back(kBn2dShape[0] * kBn2dShape[1] * kBn2dShape[2] * kBn2dShape[3] * sizeof(float));
  for (const auto& [net, s] : NetBnShapes()) {
    sizes.push_back(s[0] * s[1] * s[2] * s[3] * sizeof(float));
  }
  for (size_t b : sizes) {
    if (g_memcpy_bw.count(b) == 0) g_memcpy_bw[b] = MeasureMemcpy(b);
  }
  std::fprintf(stderr, "calibration: single-core FMA peak %.1f GFLOP/s (%s)\n", g_fma_peak / 1e9,
               kIsa);
  for (const auto& [bytes, bw] : g_memcpy_bw) {
    std::fprintf(stderr, "calibration: memcpy of %zu bytes: %.1f GB/s (read + write)\n", bytes,
                 bw / 1e9);
  }
}

}  // namespace
}  // namespace bench
}  // namespace normd

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  normd::bench::Calibrate();
  normd::bench::RegisterAll();
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
