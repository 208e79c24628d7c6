// A residual block, y = body(x) + shortcut(x): the building block of ResNets (He et al.), as
// the ResidualBlock torch module that client/python/normd ships (attributes `body` and
// `shortcut`, both nn.Sequential). An empty shortcut is the identity, as an empty
// nn.Sequential is; a projection shortcut (a strided 1x1 Conv2d with BatchNorm2d) makes the
// shapes meet when the body changes them. Blocks nest: a branch may hold any layer, blocks
// included.
//
// Ownership: the block owns the layers of both branches. Sequential::Create builds them as part
// of the model's tree (it names them, checks their shapes and counts them against the limits),
// hands them over with Append, and then calls Build, which checks that the branches meet.
//
// Forward runs the body, then the shortcut (Dropout draws in that order), each as a stack of
// layers (ForwardLayers), and leaves every inner layer's output and cache in the block's cache:
// cache->outputs and cache->children, the body's layers first. It holds no BatchNorm logic of
// its own: the Sequential reaches nested BatchNorm caches through the cache tree to record drift
// and commit running statistics.
//
// Gradient contract: Backward sends dy into both branches (d(body + shortcut)/d branch = 1),
// accumulates every inner parameter gradient (untrainable layers' stay zero) and, when dx is
// non-null, overwrites it with the sum of the branches' input gradients.
//
// Thread safety: as every layer. Backward's intermediate gradients live in per-thread scratch,
// one set per nesting depth (blocks at one depth run one after another, a nested block's dy
// and dx are its parent's buffers), so a network of many blocks holds four gradient buffers
// per depth (three, and the masked dy of a fused ReLU), not four per block; they grow to the
// largest block a thread has run and stay.
#ifndef NORMD_CORE_RESIDUAL_H_
#define NORMD_CORE_RESIDUAL_H_

#include <memory>
#include <vector>

#include "core/layer.h"

namespace normd {

class ResidualBlock : public Layer {
 public:
  // The block's kind in messages and layer statistics ("layer 4 (residual) body layer 1 ...").
  // PyTorch has no class for it; this is the spec's name for the layer kind.
  static constexpr const char* kKindName = "residual";

  enum class Branch { kBody, kShortcut };

  const char* kind_name() const override { return kKindName; }

  // Appends a built layer to a branch, with its per-sample output shape.
  // REQUIRES: before Build; layer built for the branch's previous output shape.
  void Append(Branch branch, std::unique_ptr<Layer> layer, const Shape& sample_out);

  // Checks the appended branches against the block's input: the body is not empty and ends in
  // the shape the shortcut ends in (the input's, for an identity shortcut).
  Status Build(const Shape& sample_in, Shape* sample_out) override;
  int64_t NumParameters() const override;  // of every inner layer
  void Allocate(Rng& rng) override;        // body first, then shortcut
  void Forward(const ConstTensorView& x, Tensor* y, LayerCache* cache,
               const ForwardContext& ctx) const override;
  void Backward(const ConstTensorView& x, const Tensor& y, const ConstTensorView& dy,
                const LayerCache& cache, const ForwardContext& ctx, Tensor* dx) override;
  // Fused with the ReLU after the addition (Layer::FusesRelu), as in every ResNet block: the
  // sum is not written, only its ReLU. The backward masks dy with the ReLU's output once and
  // sends the masked gradient into both branches.
  bool FusesRelu() const override { return true; }
  void ForwardWithRelu(const ConstTensorView& x, Tensor* y, LayerCache* cache,
                       const ForwardContext& ctx) const override;
  void BackwardWithRelu(const ConstTensorView& x, const Tensor& y, const ConstTensorView& dy,
                        const LayerCache& cache, const ForwardContext& ctx,
                        Tensor* dx) override;
  void RecomputeOutput(const ConstTensorView& x, const LayerCache& cache,
                       Tensor* y) const override;
  // Every inner parameter, body first; state() names them as the torch module does:
  // "body.0.weight", "shortcut.1.running_mean", ...
  std::vector<Parameter*> parameters() override;
  std::vector<StateSlot> state() override;
  ResidualBlock* AsResidualBlock() override { return this; }
  bool HasTrainableParameters() const override;

  const LayerList& body() const { return body_; }
  const LayerList& shortcut() const { return shortcut_; }
  LayerList& body() { return body_; }
  LayerList& shortcut() { return shortcut_; }
  // The index of inner layer j of a branch in cache->outputs and cache->children.
  int CacheSlot(Branch branch, int j) const {
    return branch == Branch::kBody ? j : static_cast<int>(body_.size()) + j;
  }

 private:
  void ForwardPass(const ConstTensorView& x, Tensor* y, LayerCache* cache,
                   const ForwardContext& ctx, bool relu) const;
  // The output, body + shortcut (then ReLU'd), from the branches' outputs in cache.
  void Combine(const ConstTensorView& x, const LayerCache& cache, bool relu, Tensor* y) const;

  LayerList body_;
  LayerList shortcut_;
  Shape body_out_, shortcut_out_;  // per sample; shortcut_out_ unset while the shortcut is empty
};

}  // namespace normd

#endif  // NORMD_CORE_RESIDUAL_H_
