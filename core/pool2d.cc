#include "core/pool2d.h"

#include <algorithm>
#include <cassert>
#include <cmath>
#include <limits>

namespace normd {
namespace {

constexpr int64_t kMaxConfigValue = int64_t{1} << 30;

// The input rows [begin, end) a window starting at row `start` (possibly negative, inside the
// padding) covers.
inline void Clip(int64_t start, int64_t k, int64_t size, int64_t* begin, int64_t* end) {
  *begin = std::max<int64_t>(start, 0);
  *end = std::min(start + k, size);
}

// The output columns [lo, hi) whose window column kj, ow * stride - pad + kj, lies inside
// [0, w). Kernels loop over (window row, kj) outside and over output columns inside, so the
// inner loops are long, branch-free and vectorisable.
inline void ValidColumns(int64_t kj, int64_t stride, int64_t pad, int64_t w, int64_t w_out,
                         int64_t* lo, int64_t* hi) {
  const int64_t first = pad - kj;  // ow * stride >= first
  *lo = first > 0 ? (first + stride - 1) / stride : 0;
  const int64_t last = w - 1 + pad - kj;  // ow * stride <= last
  *hi = last < 0 ? 0 : std::min(w_out, last / stride + 1);
  if (*hi < *lo) *hi = *lo;
}

// The kernel columns [begin, end) for which some output column's tap lies inside [0, w); the
// others touch only padding. Looping over these alone keeps the work proportional to the input
// even for a window (and padding) far wider than it: kernel_size may be up to 2^30.
inline void KernelColumns(int64_t k, int64_t stride, int64_t pad, int64_t w, int64_t w_out,
                          int64_t* begin, int64_t* end) {
  *begin = std::max<int64_t>(pad - (w_out - 1) * stride, 0);
  *end = std::min(k, w + pad);
}

}  // namespace

Status Pool2d::Build(const Shape& sample_in, Shape* sample_out) {
  Pool2dConfig& c = config_;
  if (c.kernel_size <= 0) return InvalidArgument("kernel_size must be positive, got ", c.kernel_size);
  if (c.stride < 0) {
    return InvalidArgument("stride must be positive (or 0 for kernel_size), got ", c.stride);
  }
  if (c.stride == 0) c.stride = c.kernel_size;
  if (c.padding < 0) return InvalidArgument("padding must be non-negative, got ", c.padding);
  if (c.kernel_size > kMaxConfigValue || c.stride > kMaxConfigValue) {
    return InvalidArgument("kernel_size and stride must be at most ", kMaxConfigValue);
  }
  if (c.padding > c.kernel_size / 2) {
    return InvalidArgument("padding ", c.padding, " must be at most half of kernel_size ",
                           c.kernel_size);
  }
  if (sample_in.rank() != 3) {
    return InvalidArgument("expects a 3-D per-sample input (C, H, W), got ",
                           sample_in.ToString());
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
  c_ = sample_in[0];
  h_ = sample_in[1];
  w_ = sample_in[2];
  h_out_ = (ph - c.kernel_size) / c.stride + 1;
  w_out_ = (pw - c.kernel_size) / c.stride + 1;
  if (max_ && h_ * w_ > std::numeric_limits<int32_t>::max()) {
    return InvalidArgument("an input plane of ", h_, "x", w_, " is too large for max pooling");
  }
  *sample_out = Shape{c_, h_out_, w_out_};
  return Status::Ok();
}

// MaxPool2d caches, per output element, the offset within its input plane of the element that
// won the window: the first maximum in row-major window order, or a NaN (as PyTorch's CPU
// kernel). Padding is -inf, so with padding <= kernel_size / 2 every window holds at least one
// real element and the offset always points into the input.
void Pool2d::Forward(const ConstTensorView& x, Tensor* y, LayerCache* cache,
                     const ForwardContext& /*ctx*/) const {
  const int64_t n = x.shape[0];
  const int64_t k = config_.kernel_size, s = config_.stride, p = config_.padding;
  int64_t kj0, kj1;
  KernelColumns(k, s, p, w_, w_out_, &kj0, &kj1);
  const int64_t planes = n * c_;
  const int64_t in_plane = h_ * w_, out_plane = h_out_ * w_out_;
  y->Resize(Shape{n, c_, h_out_, w_out_});
  float* out = y->data();

  if (max_) {
    cache->i.resize(planes * out_plane);
    for (int64_t pl = 0; pl < planes; ++pl) {
      const float* in = x.data + pl * in_plane;
      for (int64_t oh = 0; oh < h_out_; ++oh) {
        int64_t h0, h1;
        Clip(oh * s - p, k, h_, &h0, &h1);
        float* best = out + pl * out_plane + oh * w_out_;
        int32_t* arg = cache->i.data() + pl * out_plane + oh * w_out_;
        for (int64_t ow = 0; ow < w_out_; ++ow) {
          best[ow] = -std::numeric_limits<float>::infinity();
          arg[ow] = static_cast<int32_t>(h0 * w_ + std::max<int64_t>(ow * s - p, 0));
        }
        // Window elements in row-major order; a later one wins only when strictly greater.
        for (int64_t ih = h0; ih < h1; ++ih) {
          for (int64_t kj = kj0; kj < kj1; ++kj) {
            int64_t lo, hi;
            ValidColumns(kj, s, p, w_, w_out_, &lo, &hi);
            const int64_t base = ih * w_ + kj - p;  // plane offset of output column 0's tap
            for (int64_t ow = lo; ow < hi; ++ow) {
              const float v = in[base + ow * s];
              const bool take = v > best[ow] || v != v;
              best[ow] = take ? v : best[ow];
              arg[ow] = take ? static_cast<int32_t>(base + ow * s) : arg[ow];
            }
          }
        }
      }
    }
    return;
  }

  // count_include_pad: the divisor is always k * k (ceil_mode is off, so no window reaches
  // past the padded input).
  const float inv = 1.0f / static_cast<float>(k * k);
  for (int64_t pl = 0; pl < planes; ++pl) {
    const float* in = x.data + pl * in_plane;
    for (int64_t oh = 0; oh < h_out_; ++oh) {
      int64_t h0, h1;
      Clip(oh * s - p, k, h_, &h0, &h1);
      float* sum = out + pl * out_plane + oh * w_out_;
      std::fill(sum, sum + w_out_, 0.0f);
      for (int64_t ih = h0; ih < h1; ++ih) {
        for (int64_t kj = kj0; kj < kj1; ++kj) {
          int64_t lo, hi;
          ValidColumns(kj, s, p, w_, w_out_, &lo, &hi);
          const int64_t base = ih * w_ + kj - p;
          for (int64_t ow = lo; ow < hi; ++ow) sum[ow] += in[base + ow * s];
        }
      }
      for (int64_t ow = 0; ow < w_out_; ++ow) sum[ow] *= inv;
    }
  }
}

void Pool2d::Backward(const ConstTensorView& x, const Tensor& /*y*/, const ConstTensorView& dy,
                      const LayerCache& cache, const ForwardContext& /*ctx*/, Tensor* dx) {
  if (dx == nullptr) return;
  const int64_t n = x.shape[0];
  const int64_t k = config_.kernel_size, s = config_.stride, p = config_.padding;
  int64_t kj0, kj1;
  KernelColumns(k, s, p, w_, w_out_, &kj0, &kj1);
  const int64_t planes = n * c_;
  const int64_t in_plane = h_ * w_, out_plane = h_out_ * w_out_;
  dx->Resize(x.shape);
  dx->SetZero();
  float* out = dx->data();

  if (max_) {
    assert(static_cast<int64_t>(cache.i.size()) == planes * out_plane);
    const int32_t* arg = cache.i.data();
    for (int64_t pl = 0; pl < planes; ++pl) {
      float* plane = out + pl * in_plane;
      const float* g = dy.data + pl * out_plane;
      const int32_t* a = arg + pl * out_plane;
      for (int64_t o = 0; o < out_plane; ++o) plane[a[o]] += g[o];
    }
    return;
  }

  const float inv = 1.0f / static_cast<float>(k * k);
  for (int64_t pl = 0; pl < planes; ++pl) {
    float* plane = out + pl * in_plane;
    for (int64_t oh = 0; oh < h_out_; ++oh) {
      int64_t h0, h1;
      Clip(oh * s - p, k, h_, &h0, &h1);
      const float* g = dy.data + pl * out_plane + oh * w_out_;
      for (int64_t ih = h0; ih < h1; ++ih) {
        for (int64_t kj = kj0; kj < kj1; ++kj) {
          int64_t lo, hi;
          ValidColumns(kj, s, p, w_, w_out_, &lo, &hi);
          const int64_t base = ih * w_ + kj - p;
          for (int64_t ow = lo; ow < hi; ++ow) plane[base + ow * s] += g[ow] * inv;
        }
      }
    }
  }
}

Status AdaptiveAvgPool2d::Build(const Shape& sample_in, Shape* sample_out) {
  if (sample_in.rank() != 3) {
    return InvalidArgument("expects a 3-D per-sample input (C, H, W), got ", sample_in.ToString());
  }
  c_ = sample_in[0];
  plane_ = sample_in[1] * sample_in[2];
  if (plane_ == 0) return InvalidArgument("the input plane is empty: ", sample_in.ToString());
  *sample_out = Shape{c_, 1, 1};
  return Status::Ok();
}

void AdaptiveAvgPool2d::Forward(const ConstTensorView& x, Tensor* y, LayerCache* /*cache*/,
                                const ForwardContext& /*ctx*/) const {
  const int64_t planes = x.shape[0] * c_;
  y->Resize(Shape{x.shape[0], c_, 1, 1});
  const double inv = 1.0 / static_cast<double>(plane_);
  for (int64_t pl = 0; pl < planes; ++pl) {
    const float* in = x.data + pl * plane_;
    double sum = 0.0;
    for (int64_t i = 0; i < plane_; ++i) sum += in[i];
    y->data()[pl] = static_cast<float>(sum * inv);
  }
}

void AdaptiveAvgPool2d::Backward(const ConstTensorView& x, const Tensor& /*y*/,
                                 const ConstTensorView& dy, const LayerCache& /*cache*/,
                                 const ForwardContext& /*ctx*/, Tensor* dx) {
  if (dx == nullptr) return;
  const int64_t planes = x.shape[0] * c_;
  dx->Resize(x.shape);
  const float count = static_cast<float>(plane_);
  for (int64_t pl = 0; pl < planes; ++pl) {
    const float g = dy.data[pl] / count;
    std::fill(dx->data() + pl * plane_, dx->data() + (pl + 1) * plane_, g);
  }
}

}  // namespace normd
