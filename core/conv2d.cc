#include "core/conv2d.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "core/threads.h"

namespace normd {
namespace {

// Bounds that keep every size computation below far from int64 overflow; real models are
// orders of magnitude smaller, and the caller's limits reject big activations anyway.
constexpr int64_t kMaxConfigValue = int64_t{1} << 30;
// Largest im2col buffer (elements) for one sample: Cin * k * k * H_out * W_out.
constexpr int64_t kMaxColumnElements = int64_t{1} << 27;

struct Geometry {
  int64_t channels, h, w;  // input plane
  int64_t k, stride, pad;
  int64_t h_out, w_out;
};

// Output columns [lo, hi) whose input column ow * stride - pad + kj lies inside [0, w).
void ValidRange(const Geometry& g, int64_t kj, int64_t* lo, int64_t* hi) {
  const int64_t first = g.pad - kj;  // ow * stride >= first
  // At most w_out: with padding wider than the output reaches, a tap may see only padding.
  *lo = first > 0 ? std::min(g.w_out, (first + g.stride - 1) / g.stride) : 0;
  const int64_t last = g.w - 1 + g.pad - kj;  // ow * stride <= last
  *hi = last < 0 ? 0 : std::min(g.w_out, last / g.stride + 1);
  if (*hi < *lo) *hi = *lo;
}

// Unfolds one sample x (C, H, W) into col (C*k*k, H_out*W_out), row (c*k + ki)*k + kj holding
// the input value each output position sees through kernel tap (ki, kj), zero in the padding.
void Im2Col(const Geometry& g, const float* x, float* col) {
  const int64_t hw_out = g.h_out * g.w_out;
  for (int64_t c = 0; c < g.channels; ++c) {
    const float* plane = x + c * g.h * g.w;
    for (int64_t ki = 0; ki < g.k; ++ki) {
      for (int64_t kj = 0; kj < g.k; ++kj) {
        float* row = col + ((c * g.k + ki) * g.k + kj) * hw_out;
        int64_t lo, hi;
        ValidRange(g, kj, &lo, &hi);
        for (int64_t oh = 0; oh < g.h_out; ++oh) {
          float* out = row + oh * g.w_out;
          const int64_t ih = oh * g.stride - g.pad + ki;
          if (ih < 0 || ih >= g.h) {
            std::fill(out, out + g.w_out, 0.0f);
            continue;
          }
          std::fill(out, out + lo, 0.0f);
          std::fill(out + hi, out + g.w_out, 0.0f);
          const int64_t base = ih * g.w - g.pad + kj;  // input offset of output column 0
          if (g.stride == 1) {
            std::copy(plane + base + lo, plane + base + hi, out + lo);
          } else {
            for (int64_t ow = lo; ow < hi; ++ow) out[ow] = plane[base + ow * g.stride];
          }
        }
      }
    }
  }
}

// The adjoint of Im2Col: adds every column entry back onto the input position it came from.
// dx must be initialised (zeroed) by the caller.
void Col2ImAdd(const Geometry& g, const float* col, float* dx) {
  const int64_t hw_out = g.h_out * g.w_out;
  for (int64_t c = 0; c < g.channels; ++c) {
    float* plane = dx + c * g.h * g.w;
    for (int64_t ki = 0; ki < g.k; ++ki) {
      for (int64_t kj = 0; kj < g.k; ++kj) {
        const float* row = col + ((c * g.k + ki) * g.k + kj) * hw_out;
        int64_t lo, hi;
        ValidRange(g, kj, &lo, &hi);
        for (int64_t oh = 0; oh < g.h_out; ++oh) {
          const int64_t ih = oh * g.stride - g.pad + ki;
          if (ih < 0 || ih >= g.h) continue;
          const float* in = row + oh * g.w_out;
          const int64_t base = ih * g.w - g.pad + kj;
          if (g.stride == 1) {
            float* out = plane + base + lo;
            for (int64_t ow = lo; ow < hi; ++ow) out[ow - lo] += in[ow];
          } else {
            for (int64_t ow = lo; ow < hi; ++ow) plane[base + ow * g.stride] += in[ow];
          }
        }
      }
    }
  }
}

// Per-thread column buffers. Forward is const and may run on several threads at once, and a
// retained forward should not carry a column buffer it no longer needs, so the scratch lives
// with the thread; it grows to the largest layer once and is then reused without allocating.
float* ColumnScratch(int which, size_t n) {
  thread_local std::vector<float> buffers[2];
  std::vector<float>& b = buffers[which];
  if (b.size() < n) b.resize(n);
  return b.data();
}

// The im2col + GEMM paths' sizes for one layer.
struct GemmLayout {
  Geometry g;
  int64_t taps;        // C_in * k * k: rows of the column matrix
  int64_t group_taps;  // columns of a group's weight rows
  int64_t group_out;   // output channels of a group
  int64_t hw_out, in_sample, out_sample;
  bool columns_are_x;  // a 1x1 kernel, stride 1, no padding: x itself is the column matrix
};

GemmLayout LayoutOf(const Conv2dConfig& c, int64_t h, int64_t w, int64_t h_out, int64_t w_out) {
  GemmLayout l;
  l.g = Geometry{c.in_channels, h, w, c.kernel_size, c.stride, c.padding, h_out, w_out};
  l.taps = c.in_channels * c.kernel_size * c.kernel_size;
  l.group_taps = l.taps / c.groups;
  l.group_out = c.out_channels / c.groups;
  l.hw_out = h_out * w_out;
  l.in_sample = c.in_channels * h * w;
  l.out_sample = c.out_channels * l.hw_out;
  l.columns_are_x = c.kernel_size == 1 && c.stride == 1 && c.padding == 0;
  return l;
}

}  // namespace

Status Conv2d::Build(const Shape& sample_in, Shape* sample_out) {
  const Conv2dConfig& c = config_;
  if (c.in_channels <= 0 || c.out_channels <= 0) {
    return InvalidArgument("in_channels and out_channels must be positive, got ", c.in_channels,
                           " and ", c.out_channels);
  }
  if (c.kernel_size <= 0) return InvalidArgument("kernel_size must be positive, got ", c.kernel_size);
  if (c.stride <= 0) return InvalidArgument("stride must be positive, got ", c.stride);
  if (c.padding < 0) return InvalidArgument("padding must be non-negative, got ", c.padding);
  if (c.groups <= 0) return InvalidArgument("groups must be positive, got ", c.groups);
  if (c.in_channels % c.groups != 0 || c.out_channels % c.groups != 0) {
    return InvalidArgument("in_channels (", c.in_channels, ") and out_channels (", c.out_channels,
                           ") must both be divisible by groups (", c.groups, ")");
  }
  if (c.in_channels > kMaxConfigValue || c.out_channels > kMaxConfigValue ||
      c.kernel_size > kMaxConfigValue || c.stride > kMaxConfigValue ||
      c.padding > kMaxConfigValue) {
    return InvalidArgument("channels, kernel_size, stride and padding must be at most ",
                           kMaxConfigValue);
  }
  if (sample_in.rank() != 3) {
    return InvalidArgument("expects a 3-D per-sample input (C, H, W), got ",
                           sample_in.ToString());
  }
  if (sample_in[0] != c.in_channels) {
    return InvalidArgument("in_channels is ", c.in_channels, " but the input has ", sample_in[0],
                           " channels");
  }
  if (sample_in[1] > kMaxConfigValue || sample_in[2] > kMaxConfigValue) {
    return InvalidArgument("input height and width must be at most ", kMaxConfigValue, ", got ",
                           sample_in.ToString());
  }
  const int64_t ph = sample_in[1] + 2 * c.padding;
  const int64_t pw = sample_in[2] + 2 * c.padding;
  if (c.kernel_size > ph || c.kernel_size > pw) {
    return InvalidArgument("kernel_size ", c.kernel_size, " is larger than the padded input ", ph,
                           "x", pw);
  }
  const int64_t h_out = (ph - c.kernel_size) / c.stride + 1;
  const int64_t w_out = (pw - c.kernel_size) / c.stride + 1;
  const int64_t columns =
      SaturatingMul(SaturatingMul(c.in_channels, c.kernel_size * c.kernel_size),
                    SaturatingMul(h_out, w_out));
  if (columns > kMaxColumnElements) {
    return InvalidArgument("the im2col buffer (in_channels * kernel_size^2 * output positions) ",
                           "would hold ", columns, " values; at most ", kMaxColumnElements,
                           " are allowed");
  }
  h_ = sample_in[1];
  w_ = sample_in[2];
  h_out_ = h_out;
  w_out_ = w_out;
  // A 1x1 convolution is a plain matrix product, which the GEMM path does well.
  direct_ = c.groups == 1 && c.kernel_size > 1;
  if (direct_) {
    direct_conv_ = DirectConvolution(DirectConvolution::Shape{
        c.in_channels, c.out_channels, h_, w_, c.kernel_size, c.stride, c.padding});
  }
  *sample_out = Shape{c.out_channels, h_out, w_out};
  return Status::Ok();
}

int64_t Conv2d::NumParameters() const {
  const Conv2dConfig& c = config_;
  const int64_t weights = SaturatingMul(SaturatingMul(c.out_channels, c.in_channels / c.groups),
                                        SaturatingMul(c.kernel_size, c.kernel_size));
  if (!c.bias) return weights;
  return weights > INT64_MAX - c.out_channels ? INT64_MAX : weights + c.out_channels;
}

void Conv2d::Allocate(Rng& rng) {
  const Conv2dConfig& c = config_;
  const int64_t fan_in = c.in_channels / c.groups * c.kernel_size * c.kernel_size;
  // kaiming_uniform_(a=sqrt(5)) reduces to this bound, which PyTorch also uses for the bias.
  const float bound = 1.0f / std::sqrt(static_cast<float>(fan_in));
  weight_.name = "weight";
  weight_.value.Resize(
      Shape{c.out_channels, c.in_channels / c.groups, c.kernel_size, c.kernel_size});
  weight_.grad = Tensor(weight_.value.shape());
  for (int64_t i = 0; i < weight_.value.size(); ++i) {
    weight_.value.data()[i] = rng.Uniform(-bound, bound);
  }
  if (c.bias) {
    bias_.name = "bias";
    bias_.value.Resize(Shape{c.out_channels});
    bias_.grad = Tensor(bias_.value.shape());
    for (int64_t i = 0; i < c.out_channels; ++i) bias_.value.data()[i] = rng.Uniform(-bound, bound);
  }
}

std::vector<Parameter*> Conv2d::parameters() {
  if (config_.bias) return {&weight_, &bias_};
  return {&weight_};
}

void Conv2d::Forward(const ConstTensorView& x, Tensor* y, LayerCache* /*cache*/,
                     const ForwardContext& /*ctx*/) const {
  internal::ApplyComputeThreads();
  const Conv2dConfig& c = config_;
  const int64_t n = x.shape[0];
  y->Resize(Shape{n, c.out_channels, h_out_, w_out_});
  if (!direct_) {
    Im2ColForward(x, y);
    return;
  }
  direct_conv_.Forward(x.data, n, weight_.value.data(), c.bias ? bias_.value.data() : nullptr,
                       y->data());
}

void Conv2d::Backward(const ConstTensorView& x, const Tensor& /*y*/, const ConstTensorView& dy,
                      const LayerCache& /*cache*/, const ForwardContext& /*ctx*/, Tensor* dx) {
  internal::ApplyComputeThreads();
  const Conv2dConfig& c = config_;
  const int64_t n = x.shape[0];
  // An untrainable layer's gradients stay zero (Layer::trainable): they are not computed.
  if (trainable()) {
    if (direct_) {
      direct_conv_.AccumulateWeightGradient(x.data, dy.data, n, weight_.grad.data());
    } else {
      Im2ColWeightGradient(x, dy);
    }
    if (c.bias) {
      // Channels are independent: a large dy splits them across two cores, each channel
      // summing its samples in order either way.
      const int64_t hw_out = h_out_ * w_out_;
      SplitInTwo(c.out_channels, 1, kSplitWorkPerElement * n * c.out_channels * hw_out,
                 [&](int64_t c0, int64_t c1) {
                   for (int64_t s = 0; s < n; ++s) {
                     VectorMap(bias_.grad.data() + c0, c1 - c0) +=
                         ConstMatrixMap(dy.data + (s * c.out_channels + c0) * hw_out, c1 - c0,
                                        hw_out)
                             .rowwise()
                             .sum();
                   }
                 });
    }
  }
  if (dx == nullptr) return;
  dx->Resize(x.shape);
  if (direct_) {
    direct_conv_.InputGradient(dy.data, n, weight_.value.data(), dx->data());
  } else {
    Col2ImInputGradient(dy, dx);
  }
}

void Conv2d::Im2ColForward(const ConstTensorView& x, Tensor* y) const {
  const Conv2dConfig& c = config_;
  const GemmLayout l = LayoutOf(c, h_, w_, h_out_, w_out_);
  float* col = l.columns_are_x ? nullptr : ColumnScratch(0, l.taps * l.hw_out);
  for (int64_t s = 0; s < x.shape[0]; ++s) {
    const float* cols = x.data + s * l.in_sample;
    if (!l.columns_are_x) {
      Im2Col(l.g, cols, col);
      cols = col;
    }
    // Group k: weight rows [k*group_out, (k+1)*group_out) times column rows
    // [k*group_taps, (k+1)*group_taps); the column rows of a group are its input channels'.
    float* ys = y->data() + s * l.out_sample;
    for (int64_t k = 0; k < c.groups; ++k) {
      MatrixMap(ys + k * l.group_out * l.hw_out, l.group_out, l.hw_out).noalias() =
          ConstMatrixMap(weight_.value.data() + k * l.group_out * l.group_taps, l.group_out,
                         l.group_taps) *
          ConstMatrixMap(cols + k * l.group_taps * l.hw_out, l.group_taps, l.hw_out);
    }
    if (c.bias) {
      MatrixMap(ys, c.out_channels, l.hw_out).colwise() +=
          ConstVectorMap(bias_.value.data(), c.out_channels);
    }
  }
}

void Conv2d::Im2ColWeightGradient(const ConstTensorView& x, const ConstTensorView& dy) {
  const Conv2dConfig& c = config_;
  const GemmLayout l = LayoutOf(c, h_, w_, h_out_, w_out_);
  float* col = l.columns_are_x ? nullptr : ColumnScratch(0, l.taps * l.hw_out);
  for (int64_t s = 0; s < x.shape[0]; ++s) {
    const float* dys = dy.data + s * l.out_sample;
    const float* cols = x.data + s * l.in_sample;
    if (!l.columns_are_x) {
      Im2Col(l.g, cols, col);
      cols = col;
    }
    for (int64_t k = 0; k < c.groups; ++k) {
      MatrixMap(weight_.grad.data() + k * l.group_out * l.group_taps, l.group_out, l.group_taps)
          .noalias() +=
          ConstMatrixMap(dys + k * l.group_out * l.hw_out, l.group_out, l.hw_out) *
          ConstMatrixMap(cols + k * l.group_taps * l.hw_out, l.group_taps, l.hw_out).transpose();
    }
  }
}

void Conv2d::Col2ImInputGradient(const ConstTensorView& dy, Tensor* dx) const {
  const Conv2dConfig& c = config_;
  const GemmLayout l = LayoutOf(c, h_, w_, h_out_, w_out_);
  // When the columns are x itself their gradient is dx's sample.
  float* dcol = l.columns_are_x ? nullptr : ColumnScratch(1, l.taps * l.hw_out);
  if (!l.columns_are_x) dx->SetZero();
  for (int64_t s = 0; s < dy.shape[0]; ++s) {
    const float* dys = dy.data + s * l.out_sample;
    float* dxs = dx->data() + s * l.in_sample;
    float* dcols = l.columns_are_x ? dxs : dcol;
    for (int64_t k = 0; k < c.groups; ++k) {
      MatrixMap(dcols + k * l.group_taps * l.hw_out, l.group_taps, l.hw_out).noalias() =
          ConstMatrixMap(weight_.value.data() + k * l.group_out * l.group_taps, l.group_out,
                         l.group_taps)
              .transpose() *
          ConstMatrixMap(dys + k * l.group_out * l.hw_out, l.group_out, l.hw_out);
    }
    if (!l.columns_are_x) Col2ImAdd(l.g, dcol, dxs);
  }
}

}  // namespace normd
