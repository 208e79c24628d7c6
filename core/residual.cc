#include "core/residual.h"

#include <algorithm>
#include <cassert>
#include <functional>
#include <utility>

#include "core/threads.h"

namespace normd {
namespace {

// Runs body(i0, i1) over [0, n) elements of an elementwise pass, split across two cores when
// the tensor is large (SplitInTwo; each element is computed alone, so the bits do not depend on
// the split). Splits fall on whole cache lines.
void ForElements(int64_t n, const std::function<void(int64_t, int64_t)>& body) {
  SplitInTwo(n, 16, kSplitWorkPerElement * n, body);
}

// The block's elementwise passes over elements [i0, i1), on distinct arrays. (Plain functions
// of restrict pointers, so they vectorise: a lambda's captured pointers would not.)
void AddRange(float* __restrict a, const float* __restrict b, int64_t i0, int64_t i1) {
  for (int64_t i = i0; i < i1; ++i) a[i] += b[i];
}
void SumRange(const float* __restrict a, const float* __restrict b, float* __restrict out,
              int64_t i0, int64_t i1) {
  for (int64_t i = i0; i < i1; ++i) out[i] = a[i] + b[i];
}
// The ReLU layer's relu of the sum, so the pair gives its bits.
void SumReluRange(const float* __restrict a, const float* __restrict b, float* __restrict out,
                  int64_t i0, int64_t i1) {
  for (int64_t i = i0; i < i1; ++i) {
    const float v = a[i] + b[i];
    out[i] = v > 0.0f ? v : 0.0f;
  }
}
// The ReLU layer's backward: g where its output y is positive.
void MaskRange(const float* __restrict y, const float* __restrict g, float* __restrict out,
               int64_t i0, int64_t i1) {
  for (int64_t i = i0; i < i1; ++i) out[i] = y[i] > 0.0f ? g[i] : 0.0f;
}

// a += b elementwise. REQUIRES: same number of elements.
void AddInto(float* a, const float* b, int64_t n) {
  ForElements(n, [a, b](int64_t i0, int64_t i1) { AddRange(a, b, i0, i1); });
}

}  // namespace

void ResidualBlock::Append(Branch branch, std::unique_ptr<Layer> layer, const Shape& sample_out) {
  if (branch == Branch::kBody) {
    body_.push_back(std::move(layer));
    body_out_ = sample_out;
  } else {
    shortcut_.push_back(std::move(layer));
    shortcut_out_ = sample_out;
  }
}

Status ResidualBlock::Build(const Shape& sample_in, Shape* sample_out) {
  if (body_.empty()) {
    return InvalidArgument("the body is empty: a residual block needs at least one layer in it");
  }
  const Shape& shortcut = shortcut_.empty() ? sample_in : shortcut_out_;
  if (body_out_ != shortcut) {
    return InvalidArgument(
        "the body produces ", body_out_.ToString(), " per sample but the ",
        shortcut_.empty() ? "identity shortcut passes on the input's " : "shortcut produces ",
        shortcut.ToString(), "; the two are added, so they must match",
        shortcut_.empty() ? " (give the block a projection shortcut, e.g. a Conv2d with the "
                            "body's stride and output channels, and a BatchNorm2d)"
                          : "");
  }
  *sample_out = body_out_;
  return Status::Ok();
}

int64_t ResidualBlock::NumParameters() const {
  int64_t total = 0;
  for (const LayerList* branch : {&body_, &shortcut_}) {
    for (const auto& layer : *branch) {
      const int64_t p = layer->NumParameters();
      total = p > INT64_MAX - total ? INT64_MAX : total + p;
    }
  }
  return total;
}

void ResidualBlock::Allocate(Rng& rng) {
  for (auto& layer : body_) layer->Allocate(rng);
  for (auto& layer : shortcut_) layer->Allocate(rng);
}

void ResidualBlock::Forward(const ConstTensorView& x, Tensor* y, LayerCache* cache,
                            const ForwardContext& ctx) const {
  ForwardPass(x, y, cache, ctx, /*relu=*/false);
}

void ResidualBlock::ForwardWithRelu(const ConstTensorView& x, Tensor* y, LayerCache* cache,
                                    const ForwardContext& ctx) const {
  ForwardPass(x, y, cache, ctx, /*relu=*/true);
}

void ResidualBlock::RecomputeOutput(const ConstTensorView& x, const LayerCache& cache,
                                    Tensor* y) const {
  Combine(x, cache, /*relu=*/false, y);
}

void ResidualBlock::ForwardPass(const ConstTensorView& x, Tensor* y, LayerCache* cache,
                                const ForwardContext& ctx, bool relu) const {
  const size_t nb = body_.size();
  cache->outputs.resize(nb + shortcut_.size());
  cache->children.resize(nb + shortcut_.size());
  cache->has_pending_update = false;
  ForwardLayers(body_, x, ctx, cache->outputs.data(), cache->children.data());
  if (!shortcut_.empty()) {
    ForwardLayers(shortcut_, x, ctx, cache->outputs.data() + nb, cache->children.data() + nb);
  }
  Combine(x, *cache, relu, y);
}

void ResidualBlock::Combine(const ConstTensorView& x, const LayerCache& cache, bool relu,
                            Tensor* y) const {
  const Tensor& body = cache.outputs[body_.size() - 1];
  const ConstTensorView skip = shortcut_.empty() ? x : cache.outputs.back().view();
  assert(body.size() == skip.size());
  y->Resize(body.shape());
  const int64_t n = body.size();
  const float* b = body.data();
  const float* s = skip.data;
  float* out = y->data();
  if (relu) {
    ForElements(n, [b, s, out](int64_t i0, int64_t i1) { SumReluRange(b, s, out, i0, i1); });
  } else {
    ForElements(n, [b, s, out](int64_t i0, int64_t i1) { SumRange(b, s, out, i0, i1); });
  }
}

namespace {

// Backward's buffers for the blocks at one nesting depth on one thread (see the header).
struct BranchScratch {
  Tensor grad_a, grad_b;  // intermediate gradients inside a branch
  Tensor body_dx;         // the body's input gradient
  Tensor masked_dy;       // BackwardWithRelu: dy through the fused ReLU
};

// The calling thread's scratch for the block now running backward, one level deeper for the
// blocks it holds, while the guard lives.
class ScratchForDepth {
 public:
  ScratchForDepth() {
    if (stack().size() <= depth()) stack().push_back(std::make_unique<BranchScratch>());
    scratch_ = stack()[depth()].get();
    ++depth();
  }
  ~ScratchForDepth() { --depth(); }
  ScratchForDepth(const ScratchForDepth&) = delete;
  ScratchForDepth& operator=(const ScratchForDepth&) = delete;
  BranchScratch& get() { return *scratch_; }

 private:
  static std::vector<std::unique_ptr<BranchScratch>>& stack() {
    thread_local std::vector<std::unique_ptr<BranchScratch>> s;
    return s;
  }
  static size_t& depth() {
    thread_local size_t d = 0;
    return d;
  }
  BranchScratch* scratch_;
};

// dy through both branches of a block (Backward's contract), with s for scratch.
void BackwardBranches(LayerList& body, LayerList& shortcut, const ConstTensorView& x,
                      const ConstTensorView& dy, const LayerCache& cache,
                      const ForwardContext& ctx, Tensor* dx, BranchScratch& s) {
  const size_t nb = body.size();
  BackwardLayers(body, x, cache.outputs.data(), cache.children.data(), dy, ctx,
                 dx != nullptr ? &s.body_dx : nullptr, &s.grad_a, &s.grad_b);
  if (!shortcut.empty()) {
    BackwardLayers(shortcut, x, cache.outputs.data() + nb, cache.children.data() + nb, dy, ctx, dx,
                   &s.grad_a, &s.grad_b);
    if (dx != nullptr) AddInto(dx->data(), s.body_dx.data(), s.body_dx.size());
  } else if (dx != nullptr) {
    dx->Resize(x.shape);
    float* out = dx->data();
    const float* a = dy.data;
    const float* b = s.body_dx.data();
    ForElements(dx->size(),
                [a, b, out](int64_t i0, int64_t i1) { SumRange(a, b, out, i0, i1); });
  }
}

}  // namespace

void ResidualBlock::Backward(const ConstTensorView& x, const Tensor& /*y*/,
                             const ConstTensorView& dy, const LayerCache& cache,
                             const ForwardContext& ctx, Tensor* dx) {
  ScratchForDepth guard;
  BackwardBranches(body_, shortcut_, x, dy, cache, ctx, dx, guard.get());
}

void ResidualBlock::BackwardWithRelu(const ConstTensorView& x, const Tensor& y,
                                     const ConstTensorView& dy, const LayerCache& cache,
                                     const ForwardContext& ctx, Tensor* dx) {
  ScratchForDepth guard;
  BranchScratch& s = guard.get();
  // The ReLU layer's backward: dy where its output is positive.
  s.masked_dy.Resize(y.shape());
  const int64_t n = y.size();
  const float* yv = y.data();
  const float* g = dy.data;
  float* m = s.masked_dy.data();
  ForElements(n, [yv, g, m](int64_t i0, int64_t i1) { MaskRange(yv, g, m, i0, i1); });
  BackwardBranches(body_, shortcut_, x, s.masked_dy.view(), cache, ctx, dx, s);
}

std::vector<Parameter*> ResidualBlock::parameters() {
  std::vector<Parameter*> all;
  for (LayerList* branch : {&body_, &shortcut_}) {
    for (auto& layer : *branch) {
      for (Parameter* p : layer->parameters()) all.push_back(p);
    }
  }
  return all;
}

std::vector<StateSlot> ResidualBlock::state() {
  std::vector<StateSlot> all;
  for (LayerList* branch : {&body_, &shortcut_}) {
    const char* name = branch == &body_ ? "body." : "shortcut.";
    for (size_t j = 0; j < branch->size(); ++j) {
      for (StateSlot& s : (*branch)[j]->state()) {
        s.name = StrCat(name, j, ".", s.name);
        all.push_back(std::move(s));
      }
    }
  }
  return all;
}

bool ResidualBlock::HasTrainableParameters() const {
  for (const LayerList* branch : {&body_, &shortcut_}) {
    for (const auto& layer : *branch) {
      if (layer->HasTrainableParameters()) return true;
    }
  }
  return false;
}

}  // namespace normd
