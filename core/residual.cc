#include "core/residual.h"

#include <algorithm>
#include <cassert>
#include <utility>

namespace normd {
namespace {

// a += b elementwise. REQUIRES: same number of elements.
void AddInto(float* a, const float* b, int64_t n) {
  Eigen::Map<Eigen::ArrayXf>(a, n) += Eigen::Map<const Eigen::ArrayXf>(b, n);
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
  const size_t nb = body_.size();
  cache->outputs.resize(nb + shortcut_.size());
  cache->children.resize(nb + shortcut_.size());
  cache->has_pending_update = false;
  ForwardLayers(body_, x, ctx, cache->outputs.data(), cache->children.data());
  ConstTensorView skip = x;
  if (!shortcut_.empty()) {
    ForwardLayers(shortcut_, x, ctx, cache->outputs.data() + nb, cache->children.data() + nb);
    skip = cache->outputs.back().view();
  }
  const Tensor& body = cache->outputs[nb - 1];
  assert(body.size() == skip.size());
  y->Resize(body.shape());
  Eigen::Map<Eigen::ArrayXf>(y->data(), y->size()) =
      Eigen::Map<const Eigen::ArrayXf>(body.data(), body.size()) +
      Eigen::Map<const Eigen::ArrayXf>(skip.data, skip.size());
}

namespace {

// Backward's buffers for the blocks at one nesting depth on one thread (see the header).
struct BranchScratch {
  Tensor grad_a, grad_b;  // intermediate gradients inside a branch
  Tensor body_dx;         // the body's input gradient
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

}  // namespace

void ResidualBlock::Backward(const ConstTensorView& x, const Tensor& /*y*/,
                             const ConstTensorView& dy, const LayerCache& cache,
                             const ForwardContext& ctx, Tensor* dx) {
  const size_t nb = body_.size();
  ScratchForDepth guard;
  BranchScratch& s = guard.get();
  BackwardLayers(body_, x, cache.outputs.data(), cache.children.data(), dy, ctx,
                 dx != nullptr ? &s.body_dx : nullptr, &s.grad_a, &s.grad_b);
  if (!shortcut_.empty()) {
    BackwardLayers(shortcut_, x, cache.outputs.data() + nb, cache.children.data() + nb, dy, ctx, dx,
                   &s.grad_a, &s.grad_b);
    if (dx != nullptr) AddInto(dx->data(), s.body_dx.data(), s.body_dx.size());
  } else if (dx != nullptr) {
    dx->Resize(x.shape);
    Eigen::Map<Eigen::ArrayXf>(dx->data(), dx->size()) =
        Eigen::Map<const Eigen::ArrayXf>(dy.data, dy.size()) +
        Eigen::Map<const Eigen::ArrayXf>(s.body_dx.data(), s.body_dx.size());
  }
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
