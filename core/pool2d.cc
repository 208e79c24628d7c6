#include "core/pool2d.h"

#include <algorithm>
#include <cassert>
#include <cmath>
#include <limits>

#include "core/threads.h"

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
//
// Planes are independent: a large layer splits them across two cores (SplitInTwo), and each
// output is computed the same way whichever core takes its plane.
void Pool2d::Forward(const ConstTensorView& x, Tensor* y, LayerCache* cache,
                     const ForwardContext& /*ctx*/) const {
  const int64_t n = x.shape[0];
  const int64_t planes = n * c_;
  y->Resize(Shape{n, c_, h_out_, w_out_});
  if (max_) cache->i.resize(planes * h_out_ * w_out_);
  const float* in = x.data;
  float* out = y->data();
  int32_t* arg = max_ ? cache->i.data() : nullptr;
  SplitInTwo(planes, 1, kSplitWorkPerElement * planes * h_ * w_,
             [&](int64_t p0, int64_t p1) { ForwardPlanes(in, p0, p1, out, arg); });
}

void Pool2d::ForwardPlanes(const float* x, int64_t p0, int64_t p1, float* y,
                           int32_t* arg) const {
  const int64_t k = config_.kernel_size, s = config_.stride, p = config_.padding;
  const int64_t in_plane = h_ * w_, out_plane = h_out_ * w_out_;
  if (max_ && k == 2 && s == 2 && p == 0) {
    // The usual 2x2 window with stride 2: its four elements read directly, in the generic
    // loop's order and with its rule (the first element stands for the -inf it would replace:
    // either wins the same comparisons).
    for (int64_t pl = p0; pl < p1; ++pl) {
      for (int64_t oh = 0; oh < h_out_; ++oh) {
        const int64_t row = 2 * oh * w_;
        const float* r0 = x + pl * in_plane + row;
        const float* r1 = r0 + w_;
        float* best = y + pl * out_plane + oh * w_out_;
        int32_t* at = arg + pl * out_plane + oh * w_out_;
        for (int64_t ow = 0; ow < w_out_; ++ow) {
          float b = r0[2 * ow];
          int32_t i = static_cast<int32_t>(row + 2 * ow);
          const float v1 = r0[2 * ow + 1], v2 = r1[2 * ow], v3 = r1[2 * ow + 1];
          if (v1 > b || v1 != v1) b = v1, i = static_cast<int32_t>(row + 2 * ow + 1);
          if (v2 > b || v2 != v2) b = v2, i = static_cast<int32_t>(row + w_ + 2 * ow);
          if (v3 > b || v3 != v3) b = v3, i = static_cast<int32_t>(row + w_ + 2 * ow + 1);
          best[ow] = b;
          at[ow] = i;
        }
      }
    }
    return;
  }

  int64_t kj0, kj1;
  KernelColumns(k, s, p, w_, w_out_, &kj0, &kj1);
  if (max_) {
    for (int64_t pl = p0; pl < p1; ++pl) {
      const float* in = x + pl * in_plane;
      for (int64_t oh = 0; oh < h_out_; ++oh) {
        int64_t h0, h1;
        Clip(oh * s - p, k, h_, &h0, &h1);
        float* best = y + pl * out_plane + oh * w_out_;
        int32_t* at = arg + pl * out_plane + oh * w_out_;
        for (int64_t ow = 0; ow < w_out_; ++ow) {
          best[ow] = -std::numeric_limits<float>::infinity();
          at[ow] = static_cast<int32_t>(h0 * w_ + std::max<int64_t>(ow * s - p, 0));
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
              at[ow] = take ? static_cast<int32_t>(base + ow * s) : at[ow];
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
  for (int64_t pl = p0; pl < p1; ++pl) {
    const float* in = x + pl * in_plane;
    for (int64_t oh = 0; oh < h_out_; ++oh) {
      int64_t h0, h1;
      Clip(oh * s - p, k, h_, &h0, &h1);
      float* sum = y + pl * out_plane + oh * w_out_;
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
  const int64_t planes = x.shape[0] * c_;
  assert(!max_ || static_cast<int64_t>(cache.i.size()) == planes * h_out_ * w_out_);
  dx->Resize(x.shape);
  const float* g = dy.data;
  const int32_t* arg = max_ ? cache.i.data() : nullptr;
  float* out = dx->data();
  SplitInTwo(planes, 1, kSplitWorkPerElement * planes * h_ * w_,
             [&](int64_t p0, int64_t p1) { BackwardPlanes(g, arg, p0, p1, out); });
}

// Each plane of dx is zeroed and then receives its gradients while it is still in the cache.
void Pool2d::BackwardPlanes(const float* dy, const int32_t* arg, int64_t p0, int64_t p1,
                            float* dx) const {
  const int64_t k = config_.kernel_size, s = config_.stride, p = config_.padding;
  const int64_t in_plane = h_ * w_, out_plane = h_out_ * w_out_;
  std::fill(dx + p0 * in_plane, dx + p1 * in_plane, 0.0f);
  if (max_) {
    for (int64_t pl = p0; pl < p1; ++pl) {
      float* plane = dx + pl * in_plane;
      const float* g = dy + pl * out_plane;
      const int32_t* a = arg + pl * out_plane;
      for (int64_t o = 0; o < out_plane; ++o) plane[a[o]] += g[o];
    }
    return;
  }

  int64_t kj0, kj1;
  KernelColumns(k, s, p, w_, w_out_, &kj0, &kj1);
  const float inv = 1.0f / static_cast<float>(k * k);
  for (int64_t pl = p0; pl < p1; ++pl) {
    float* plane = dx + pl * in_plane;
    for (int64_t oh = 0; oh < h_out_; ++oh) {
      int64_t h0, h1;
      Clip(oh * s - p, k, h_, &h0, &h1);
      const float* g = dy + pl * out_plane + oh * w_out_;
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
