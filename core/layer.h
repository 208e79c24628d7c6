// The layer interface shared by every layer of the library.
//
// A layer keeps three kinds of state apart: configuration (fixed at construction), parameters
// (tensors with gradients: weight, bias) and buffers (no gradients: BatchNorm's running
// statistics). A layer object holds no per-call state: what a Forward must hand to its Backward
// lives in a LayerCache owned by the caller (a ForwardRecord), so several forwards of one model
// may be retained at once and eval-mode forwards may run concurrently.
//
// Thread safety: Forward is const and may run concurrently with other Forwards. Backward
// (which accumulates parameter gradients) and every non-const method need exclusive access.
#ifndef NORMD_CORE_LAYER_H_
#define NORMD_CORE_LAYER_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/collective.h"
#include "core/config.h"
#include "core/rng.h"
#include "core/status.h"
#include "core/tensor.h"

namespace normd {

// A tensor with a gradient. `grad` has the shape of `value`.
struct Parameter {
  std::string name;  // PyTorch's attribute name: "weight", "bias"
  Tensor value;
  Tensor grad;
};

// One named entry of a layer's state (PyTorch state_dict naming, without the layer prefix).
// Exactly one of `tensor` and `counter` is set; a counter is a 0-d integer tensor in PyTorch
// (num_batches_tracked).
struct StateSlot {
  std::string name;
  Tensor* tensor = nullptr;
  int64_t* counter = nullptr;
};

// What a layer's Forward leaves for its Backward. The layer decides what goes where; the
// vectors keep their capacity between calls, so a reused cache does not allocate.
struct LayerCache {
  std::vector<float> f;
  std::vector<double> d;
  std::vector<int32_t> i;
  // BatchNorm only: the pending running-statistics update is valid (see BatchNorm::Commit).
  bool has_pending_update = false;
  // ForwardLayers fused the ReLU that follows into this layer (Layer::ForwardWithRelu), so
  // the layer's own output was not written (it is empty).
  bool relu_fused = false;
  // A layer that holds layers (ResidualBlock): per inner layer, in the block's order (body,
  // then shortcut), its output and its own cache. The tree of caches mirrors the tree of
  // layers, so the Sequential can reach a nested layer's cache by its path (LayerNode).
  std::vector<Tensor> outputs;
  std::vector<LayerCache> children;
};

struct ForwardContext {
  // Train-mode semantics: BatchNorm normalises with batch statistics, Dropout drops.
  bool training = false;
  // BatchNorm records a pending running-statistics update in its cache (training and not
  // frozen); it is applied later by BatchNorm::Commit so a failed step changes nothing.
  bool update_running_stats = false;
  // Dropout's generator. Non-null when training (unless adapting).
  Rng* rng = nullptr;
  // Model::AccumulateStatistics (AdaBN): with training, norm layers normalise with batch
  // statistics as in training while Dropout is the identity; nothing is updated.
  bool adapting = false;
  // Data-parallel training (core/collective.h): the forward's input is rows [row_offset,
  // row_offset + N) of a batch of global_rows split over the ranks (N may be 0). BatchNorm then
  // normalises with the whole batch's statistics and Dropout draws the whole batch's mask.
  DataParallelShard shard;
};

class BatchNorm;
class ResidualBlock;

class Layer {
 public:
  virtual ~Layer() = default;

  // PyTorch's class name: "Linear", "BatchNorm1d", ...
  virtual const char* kind_name() const = 0;

  // Checks the configuration against the per-sample input shape and computes the per-sample
  // output shape. Allocates nothing: a hostile configuration is rejected by the caller's limits
  // (NumParameters) before Allocate runs. Messages describe the problem without the layer
  // prefix, which the caller adds.
  virtual Status Build(const Shape& sample_in, Shape* sample_out) = 0;

  // Number of parameter elements the layer will allocate. REQUIRES: Build succeeded.
  virtual int64_t NumParameters() const { return 0; }

  // Allocates parameters and buffers and initialises them with PyTorch's default
  // distributions, drawing from rng. REQUIRES: Build succeeded.
  virtual void Allocate(Rng& /*rng*/) {}

  // Checks a batch shape against this layer's training-time rules (BatchNorm's "more than one
  // value per channel"). The batch shape is (N, sample_in...).
  virtual Status CheckBatch(const Shape& /*batch_in*/, const ForwardContext& /*ctx*/) const {
    return Status::Ok();
  }

  // y = layer(x). x has shape (N, sample_in...); y is resized to (N, sample_out...).
  // Fills `cache` with what Backward needs.
  virtual void Forward(const ConstTensorView& x, Tensor* y, LayerCache* cache,
                       const ForwardContext& ctx) const = 0;

  // Given x and y of the Forward that filled `cache` and dy = dL/dy, accumulates (adds) the
  // parameter gradients into each Parameter::grad and, when dx is non-null, writes (overwrites)
  // dL/dx into *dx, resized to x's shape.
  virtual void Backward(const ConstTensorView& x, const Tensor& y, const ConstTensorView& dy,
                        const LayerCache& cache, const ForwardContext& ctx, Tensor* dx) = 0;

  virtual std::vector<Parameter*> parameters() { return {}; }
  // Parameters followed by buffers, in PyTorch's state_dict order.
  virtual std::vector<StateSlot> state();

  // Running statistics of layers other than BatchNorm (InstanceNorm with tracking), which
  // Sequential handles alike. ApplyPendingUpdate applies the update a training Forward left
  // in `cache` (LayerCache::has_pending_update) and clears it; ResetRunningStats is PyTorch's
  // reset_running_stats. Both need exclusive access and do nothing by default.
  virtual void ApplyPendingUpdate(LayerCache* /*cache*/) {}
  virtual void ResetRunningStats() {}

  // ---- Fusion with a ReLU that directly follows (ForwardLayers, BackwardLayers) ----
  //
  // A layer whose FusesRelu() is true runs together with a ReLU after it in the same stack:
  // ForwardWithRelu writes y = relu(layer(x)) (the ReLU layer's relu, v > 0 ? v : 0) bit for
  // bit as Forward and then the ReLU layer would, without writing the layer's own output,
  // and fills `cache` as Forward does; BackwardWithRelu is the pair's backward, given the
  // ReLU's output y and dy = dL/dy, with Backward's contract otherwise; RecomputeOutput gives
  // back the output ForwardWithRelu did not write (what Forward would have), from the same x and
  // cache. The other methods REQUIRE FusesRelu() (they abort otherwise).
  virtual bool FusesRelu() const { return false; }
  virtual void ForwardWithRelu(const ConstTensorView& x, Tensor* y, LayerCache* cache,
                               const ForwardContext& ctx) const;
  virtual void BackwardWithRelu(const ConstTensorView& x, const Tensor& y,
                                const ConstTensorView& dy, const LayerCache& cache,
                                const ForwardContext& ctx, Tensor* dx);
  virtual void RecomputeOutput(const ConstTensorView& x, const LayerCache& cache,
                               Tensor* y) const;

  // Non-null for BatchNorm layers.
  virtual BatchNorm* AsBatchNorm() { return nullptr; }
  const BatchNorm* AsBatchNorm() const { return const_cast<Layer*>(this)->AsBatchNorm(); }
  // Non-null for residual blocks, which hold layers of their own.
  virtual ResidualBlock* AsResidualBlock() { return nullptr; }
  const ResidualBlock* AsResidualBlock() const {
    return const_cast<Layer*>(this)->AsResidualBlock();
  }

  // True when a backward pass through this layer accumulates some parameter gradient: the
  // layer has parameters and is trainable (a residual block: one of its layers does).
  virtual bool HasTrainableParameters() const { return trainable() && NumParameters() > 0; }

  // ---- Per-layer training options (Model::SetLayerOptions; PyTorch's fine-tuning idioms) ----
  //
  // Frozen: a layer with running statistics normalises with them in train-mode forwards too,
  // never updates them, and back-propagates as in eval mode (running statistics are constants):
  // PyTorch's `module.eval()` inside a model in train mode. Only layers whose
  // HasRunningStats() is true can be frozen; a layer that overrides it must honour frozen() in
  // CheckBatch, Forward and Backward (BatchNorm does; InstanceNorm with running statistics is
  // the next one).
  virtual bool HasRunningStats() const { return false; }
  bool frozen() const { return frozen_; }
  // REQUIRES: !frozen || HasRunningStats(); exclusive access.
  void set_frozen(bool frozen) { frozen_ = frozen; }
  //
  // Trainable: false is PyTorch's `requires_grad_(False)` on the layer's parameters. Sequential
  // keeps such a layer's parameter gradients at zero (a layer's Backward may skip computing
  // them) and the optimizer leaves its parameters and their optimizer state alone.
  bool trainable() const { return trainable_; }
  // Exclusive access. The caller zeroes the gradients of a layer made untrainable.
  void set_trainable(bool trainable) { trainable_ = trainable; }

 private:
  bool frozen_ = false;
  bool trainable_ = true;
};

// Creates the layer for `config` (not yet built). A residual block comes with empty branches:
// Sequential::Create builds its layers (it names and checks them as part of the model's tree).
std::unique_ptr<Layer> MakeLayer(const LayerConfig& config);

// An ordered stack of owned layers: a Sequential, or a branch of a residual block.
using LayerList = std::vector<std::unique_ptr<Layer>>;

// Told by BackwardLayers when layer j of the stack has finished its backward pass: the parameter
// gradients of layer j (of every layer inside it, for a block) are final for this pass.
class BackwardListener {
 public:
  virtual ~BackwardListener() = default;
  virtual void LayerDone(int j) = 0;
};

// Runs layers[0], layers[1], ... on x: layer j reads the previous layer's output (x for the
// first) and writes outputs[j] and caches[j]. A layer that fuses a ReLU (Layer::FusesRelu:
// BatchNorm, a residual block) directly followed by one runs with it as one layer
// (ForwardWithRelu): the ReLU's output is written, the layer's own is left empty and its cache
// says so (LayerCache::relu_fused; Layer::RecomputeOutput gives it back). REQUIRES: layers is
// not empty; outputs and caches have room for layers.size() entries.
void ForwardLayers(const LayerList& layers, const ConstTensorView& x, const ForwardContext& ctx,
                   Tensor* outputs, LayerCache* caches);

// Back-propagates dy (the gradient w.r.t. the last layer's output) through the stack that
// ForwardLayers(x, ..., outputs, caches) ran, accumulating parameter gradients; an untrainable
// layer's (Layer::trainable) stay zero. dx (overwritten) receives dL/dx when non-null; without
// it the pass stops below the lowest layer with trainable parameters (PyTorch's autograd stops
// there too, so a frozen backbone costs nothing). buf_a and buf_b are scratch for the
// intermediate gradients; neither may hold dy. A non-null listener hears of each layer it
// finishes (layers below the stopping point are never reported). A fused pair goes back in
// one call (Layer::BackwardWithRelu), both layers reported.
void BackwardLayers(LayerList& layers, const ConstTensorView& x, const Tensor* outputs,
                    const LayerCache* caches, const ConstTensorView& dy, const ForwardContext& ctx,
                    Tensor* dx, Tensor* buf_a, Tensor* buf_b,
                    BackwardListener* listener = nullptr);

}  // namespace normd

#endif  // NORMD_CORE_LAYER_H_
