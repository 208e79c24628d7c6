// Sequential: an ordered stack of layers that owns them, as PyTorch's nn.Sequential, and the
// ForwardRecord that carries one forward pass to its backward pass.
//
// Shapes are inferred at construction from the per-sample input shape; an architecture error
// is reported then, naming the layer ("layer 3 (BatchNorm1d): num_features is 64 but the
// previous layer produces 50 features").
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

namespace normd {

// Mean and standard deviation (population) of a tensor, for the per-layer statistics report.
struct MeanStd {
  double mean = 0.0;
  double std = 0.0;
};

struct LayerActivationStats {
  int layer = 0;
  MeanStd input;
  MeanStd output;
};

// One forward pass: every layer's output and cache, and what the BatchNorm layers measured.
// A record is reused across calls of the same batch shape without allocating.
class ForwardRecord {
 public:
  struct BatchNormReport {
    int layer = 0;  // index in the Sequential
    BatchNormDrift drift;
    BatchNormUpdate update;  // filled by CommitRunningStats
    bool committed = false;
  };

  const Tensor& output() const { return outputs_.back(); }
  ConstTensorView input() const { return input_; }
  int64_t batch_size() const { return input_.rows(); }
  const ForwardContext& context() const { return ctx_; }
  const std::vector<BatchNormReport>& batch_norms() const { return bn_reports_; }
  // What layer i's Forward left for its Backward.
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
    int max_layers = 256;
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
  int num_layers() const { return static_cast<int>(layers_.size()); }
  Layer& layer(int i) { return *layers_[i]; }
  const Layer& layer(int i) const { return *layers_[i]; }
  // The layer's label: its configured name, or its index.
  const std::string& layer_name(int i) const { return names_[i]; }
  int64_t parameter_count() const { return parameter_count_; }
  // Per-sample output shape of layer i.
  const Shape& layer_output_shape(int i) const { return shapes_[i + 1]; }

  // Checks a batch against the model: rank and per-sample shape, at least one sample, and
  // each layer's training rules (BatchNorm's one value per channel).
  Status CheckInput(const Shape& batch_shape, const ForwardContext& ctx) const;

  // Runs every layer on x, recording outputs and caches in rec (which refers to x's storage
  // until rec->RetainInput()). ctx.rng is copied: the record holds the generator's state after
  // the draws, applied by CommitRunningStats. REQUIRES: CheckInput(x.shape, ctx) is OK.
  void Forward(const ConstTensorView& x, const ForwardContext& ctx, ForwardRecord* rec) const;

  // Back-propagates dy (the gradient of the loss w.r.t. rec's output) through every layer,
  // accumulating parameter gradients, except into untrainable layers' (Layer::trainable),
  // which stay zero; without dx it stops below the lowest layer with trainable parameters.
  // When dx is non-null it receives dL/d(input).
  // REQUIRES: dy has the output's shape; the parameters are those rec's forward used.
  void Backward(ForwardRecord* rec, const ConstTensorView& dy, Tensor* dx);

  // Applies rec's pending BatchNorm running-statistics updates, filling the update norms in
  // rec's reports. Returns the generator state after the forward's dropout draws.
  Rng CommitRunningStats(ForwardRecord* rec);

  void ZeroGrad();
  // Index of the first layer whose parameter gradients hold a non-finite value, or -1.
  int FirstNonFiniteGradLayer();

  std::vector<Parameter*> parameters();
  // Per entry of parameters(): its layer is trainable (Layer::trainable).
  std::vector<bool> parameter_trainable();
  // "0.weight", "1.bias", ... in the order of parameters().
  std::vector<std::string> parameter_names();
  // Every layer's state with PyTorch nn.Sequential names: "0.weight", "1.running_mean", ...
  std::vector<StateSlot> state();

  void ResetRunningStats();

  // Per layer, mean and std of the input entering and the output leaving it.
  std::vector<LayerActivationStats> ActivationStats(const ForwardRecord& rec) const;

 private:
  Sequential() = default;

  Shape input_shape_;
  Shape output_shape_;
  std::vector<Shape> shapes_;  // shapes_[i]: per-sample input of layer i; back(): output
  std::vector<std::unique_ptr<Layer>> layers_;
  std::vector<std::string> names_;
  int64_t parameter_count_ = 0;
};

}  // namespace normd

#endif  // NORMD_CORE_SEQUENTIAL_H_
