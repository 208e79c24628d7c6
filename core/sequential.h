// Sequential: an ordered stack of layers that owns them, as PyTorch's nn.Sequential, and the
// ForwardRecord that carries one forward pass to its backward pass.
//
// The layers form a tree: a residual block (core/residual.h) holds two stacks of its own, which
// may hold blocks again. The Sequential walks that tree once, at construction, into a list of
// LayerNodes in PyTorch's module order (a block, then its body's layers, then its shortcut's),
// each with its path, the state_dict prefix ("4", "4.body.1"), and its label (its configured
// name, or its path). Everything that names or visits layers uses this one list: state_dict
// names, BatchNorm drift reports and running-statistics commits, per-layer options, layer
// statistics. A model without blocks has one node per layer, node i being layer i.
//
// Shapes are inferred at construction from the per-sample input shape; an architecture error
// is reported then, naming the layer by its place in the tree ("layer 3 (BatchNorm1d):
// num_features is 64 but the previous layer produces 50 features", "layer 4 (residual) body
// layer 1 (BatchNorm2d): ...").
//
// Thread safety: Forward is const and may run concurrently (eval-mode serving). Backward,
// CommitRunningStats, ZeroGrad and state changes need exclusive access.
#ifndef NORMD_CORE_SEQUENTIAL_H_
#define NORMD_CORE_SEQUENTIAL_H_

#include <cstdint>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "core/batch_norm.h"
#include "core/layer.h"
#include "core/residual.h"

namespace normd {

// Mean and standard deviation (population) of a tensor, for the per-layer statistics report.
struct MeanStd {
  double mean = 0.0;
  double std = 0.0;
};

struct LayerActivationStats {
  int layer = 0;  // node index (Sequential::nodes())
  MeanStd input;
  MeanStd output;
};

// The moments of every value of a node's input and output, each as one group (a
// ChannelMoments of one channel): moments of a batch's row shards combine with CombineMoments
// into the whole batch's, as SyncBatchNorm's statistics do, so a data-parallel job can report
// the whole batch's LayerActivationStats.
struct LayerActivationMoments {
  int layer = 0;  // node index (Sequential::nodes())
  ChannelMoments input;
  ChannelMoments output;
};

// Mean and population std (sqrt(M2 / count)) of one-channel moments; zeros when empty.
MeanStd MeanStdOf(const ChannelMoments& m);

// One layer of the model's tree (see the file comment).
struct LayerNode {
  Layer* layer = nullptr;  // owned by the Sequential or by the block holding it
  std::string path;        // state_dict prefix: "4", "4.body.1", "4.shortcut.0"
  std::string label;       // the configured name, or the path
  // How messages name it: "layer 4 (residual) body layer 1 (BatchNorm2d)".
  std::string description;
  int parent = -1;    // node index of the residual block holding it; -1 at the top level
  int previous = -1;  // node index of the layer before it in the same stack; -1 when first
  // Index among the top-level layers (parent < 0), or in the parent block's cache tree
  // (ResidualBlock::CacheSlot).
  int slot = 0;
  int depth = 0;       // 0 at the top level, 1 inside a top-level block, ...
  Shape input_shape;   // per sample
  Shape output_shape;  // per sample
};

// One forward pass: every layer's output and cache, and what the BatchNorm layers measured.
// A record is reused across calls of the same batch shape without allocating.
class ForwardRecord {
 public:
  struct BatchNormReport {
    int layer = 0;  // node index (Sequential::nodes())
    BatchNormDrift drift;
    BatchNormUpdate update;  // filled by CommitRunningStats
    bool committed = false;
  };

  const Tensor& output() const { return outputs_.back(); }
  ConstTensorView input() const { return input_; }
  int64_t batch_size() const { return input_.rows(); }
  const ForwardContext& context() const { return ctx_; }
  // One report per BatchNorm node, in node order.
  const std::vector<BatchNormReport>& batch_norms() const { return bn_reports_; }
  // What top-level layer i's Forward left for its Backward (Sequential::NodeCache reaches
  // nested layers').
  const LayerCache& cache(int layer) const { return caches_[layer]; }

  // Copies the input into the record, so the record no longer refers to the caller's buffer
  // (needed when a forward is retained beyond the request that carried its input).
  void RetainInput();

  // Version stamps of the model this forward ran against (see Model).
  uint64_t params_version = 0;
  uint64_t mode_version = 0;

 private:
  friend class Sequential;
  ForwardContext ctx_;
  ConstTensorView input_;
  Tensor input_copy_;
  std::vector<Tensor> outputs_;  // outputs_[i]: layer i's output
  std::vector<LayerCache> caches_;
  std::vector<BatchNormReport> bn_reports_;
  Tensor grad_a_, grad_b_;  // backward ping-pong buffers
  Rng rng_after_;           // the generator after this forward's dropout draws
};

class Sequential {
 public:
  struct Limits {
    int64_t max_parameters = std::numeric_limits<int64_t>::max();
    int max_layers = 256;  // every layer of the tree: residual blocks and their layers count
    // Largest per-sample activation (elements) any layer may produce.
    int64_t max_sample_elements = int64_t{1} << 28;
  };

  // Builds the layers for `input_shape`, checks every shape and the limits, then allocates and
  // initialises parameters from `seed` (PyTorch's default distributions).
  static Status Create(const std::vector<int64_t>& input_shape,
                       const std::vector<LayerConfig>& layers, uint64_t seed,
                       const Limits& limits, std::unique_ptr<Sequential>* out);

  const Shape& input_shape() const { return input_shape_; }    // per sample
  const Shape& output_shape() const { return output_shape_; }  // per sample
  // The top-level layers.
  int num_layers() const { return static_cast<int>(layers_.size()); }
  Layer& layer(int i) { return *layers_[i]; }
  const Layer& layer(int i) const { return *layers_[i]; }
  // The top-level layer's label: its configured name, or its index.
  const std::string& layer_name(int i) const { return nodes_[top_nodes_[i]].label; }
  int64_t parameter_count() const { return parameter_count_; }
  // Per-sample output shape of top-level layer i.
  const Shape& layer_output_shape(int i) const { return shapes_[i + 1]; }

  // Every layer of the tree, in PyTorch's module order (see the file comment).
  const std::vector<LayerNode>& nodes() const { return nodes_; }
  const LayerNode& node(int i) const { return nodes_[i]; }
  int num_nodes() const { return static_cast<int>(nodes_.size()); }
  // The node index of top-level layer i.
  int top_node(int i) const { return top_nodes_[i]; }
  // The node labelled `label` (a configured name first), else the node whose path it is
  // ("3", "4.body.1"); -1 when none.
  int FindNode(const std::string& label) const;
  // What node i's Forward in rec left for its Backward, and its input and output there. The
  // output of a layer fused with the ReLU after it (LayerCache::relu_fused) was never written:
  // it is recomputed into *scratch, which the returned view then refers to.
  // REQUIRES: rec holds a forward of this Sequential.
  const LayerCache& NodeCache(const ForwardRecord& rec, int node) const;
  LayerCache& NodeCache(ForwardRecord* rec, int node) const;
  ConstTensorView NodeInput(const ForwardRecord& rec, int node, Tensor* scratch) const;
  ConstTensorView NodeOutput(const ForwardRecord& rec, int node, Tensor* scratch) const;

  // Checks a batch against the model: rank and per-sample shape, at least one sample, and
  // each layer's training rules (BatchNorm's one value per channel), nested layers' included.
  Status CheckInput(const Shape& batch_shape, const ForwardContext& ctx) const;

  // Runs every layer on x, recording outputs and caches in rec (which refers to x's storage
  // until rec->RetainInput()). ctx.rng is copied: the record holds the generator's state after
  // the draws, applied by CommitRunningStats. REQUIRES: CheckInput(x.shape, ctx) is OK.
  void Forward(const ConstTensorView& x, const ForwardContext& ctx, ForwardRecord* rec) const;

  // Back-propagates dy (the gradient of the loss w.r.t. rec's output) through every layer,
  // accumulating parameter gradients, except into untrainable layers' (Layer::trainable),
  // which stay zero; without dx it stops below the lowest layer with trainable parameters
  // (BackwardLayers). When dx is non-null it receives dL/d(input).
  // A non-null listener hears of each top-level layer finished (BackwardListener).
  // REQUIRES: dy has the output's shape; the parameters are those rec's forward used.
  void Backward(ForwardRecord* rec, const ConstTensorView& dy, Tensor* dx,
                BackwardListener* listener = nullptr);

  // Applies rec's pending running-statistics updates (BatchNorm's, filling the update norms
  // in rec's reports, and other norm layers'), nested layers' included. Returns the generator
  // state after the forward's dropout draws.
  Rng CommitRunningStats(ForwardRecord* rec);

  void ZeroGrad();
  // Node index of the first layer whose parameter gradients hold a non-finite value, or -1.
  int FirstNonFiniteGradLayer();

  // Every parameter of the tree, in node order (PyTorch's named_parameters order).
  std::vector<Parameter*> parameters();
  // Per entry of parameters(): its layer is trainable (Layer::trainable).
  std::vector<bool> parameter_trainable();
  // "0.weight", "4.body.0.weight", ... in the order of parameters().
  std::vector<std::string> parameter_names();
  // Every layer's state with PyTorch names: "0.weight", "1.running_mean",
  // "4.body.1.running_var", ... in state_dict order.
  std::vector<StateSlot> state();

  void ResetRunningStats();

  // Per node, mean and std of the input entering and the output leaving it, over rec's rows.
  // Equals MeanStdOf of ActivationMoments(rec).
  std::vector<LayerActivationStats> ActivationStats(const ForwardRecord& rec) const;
  // Per node, the moments of the input entering and the output leaving it, over rec's rows
  // (two passes: mean = sum / count, then M2; a record of no rows gives empty moments).
  std::vector<LayerActivationMoments> ActivationMoments(const ForwardRecord& rec) const;

 private:
  struct Builder;
  Sequential() = default;

  Shape input_shape_;
  Shape output_shape_;
  std::vector<Shape> shapes_;  // shapes_[i]: per-sample input of layer i; back(): output
  LayerList layers_;
  std::vector<LayerNode> nodes_;
  std::vector<int> top_nodes_;         // node index of each top-level layer
  std::vector<int> batch_norm_nodes_;  // node indices of the BatchNorm layers
  int64_t parameter_count_ = 0;
};

}  // namespace normd

#endif  // NORMD_CORE_SEQUENTIAL_H_
