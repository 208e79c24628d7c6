// Model: a Sequential with its loss, optimizer, mode and step counter — what the service holds
// per model id, and what benchmarks drive in-process.
//
// Every mutating operation validates first, then computes, then commits, so a request that
// fails leaves the model exactly as it was (parameters, buffers, optimizer state, step).
// In particular TrainStep and ApplyGradients refuse non-finite losses or gradients with
// FAILED_PRECONDITION before touching anything.
//
// Thread safety: methods marked "shared" may run concurrently with each other; every other
// method needs exclusive access (the server holds a reader/writer lock per model). The
// BatchNorm status (last drift figures) has its own internal mutex so shared forwards can
// record it.
#ifndef NORMD_CORE_MODEL_H_
#define NORMD_CORE_MODEL_H_

#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "core/config.h"
#include "core/gradient_buckets.h"
#include "core/loss.h"
#include "core/optimizer.h"
#include "core/sequential.h"

namespace normd {

// A named tensor of a model's state, with PyTorch state_dict names. Counters
// (num_batches_tracked, optimizer steps) are 0-d tensors holding an integer value.
struct NamedTensor {
  std::string name;
  Shape shape;
  std::vector<float> values;
};

// What the service reports per BatchNorm layer, nested ones included.
struct BatchNormStatus {
  int layer = 0;     // node index (Sequential::nodes())
  std::string name;  // the layer's label: its configured name, or its path ("4.body.1")
  int64_t num_batches_tracked = 0;
  float last_mean_shift = 0.0f;
  float last_var_log_ratio = 0.0f;
  float running_mean_update_norm = 0.0f;
  float running_var_update_norm = 0.0f;
};

// A layer's training options (see Layer::frozen and Layer::trainable), as reported for every
// layer that has parameters or running statistics (not for residual blocks, whose options are
// their layers').
struct LayerOptionsStatus {
  int layer = 0;     // node index
  std::string name;  // the layer's label
  bool frozen = false;
  bool trainable = true;
};

// One change of Model::SetLayerOptions: the layer's label (its configured name, or its path:
// "3", "4.body.1"); an unset field keeps its value.
struct LayerOptionsChange {
  std::string layer;
  std::optional<bool> frozen;
  std::optional<bool> trainable;
};

// A BatchNorm layer that normalised a training batch with statistics over few values per
// channel (Model::SmallBatches).
struct SmallBatchReport {
  int layer = 0;     // node index
  std::string name;  // the layer's label
  int64_t values_per_channel = 0;
};

// What one optimizer step (ApplyGradients, TrainStep) did.
struct StepResult {
  uint64_t step = 0;             // the model's step count after it
  double grad_norm = 0.0;        // total 2-norm of the gradients, before clipping
  double learning_rate = 0.0;    // the (scheduled) rate the optimizer used
};

struct TrainResult {
  double loss = 0.0;
  uint64_t step = 0;
  int64_t samples = 0;
  double grad_norm = 0.0;      // as StepResult
  double learning_rate = 0.0;
};

struct EvalResult {
  double loss = 0.0;
  double accuracy = 0.0;  // cross-entropy only; 0 otherwise
  int64_t samples = 0;
};

// The pooled per-channel moments of the values that reached each adapted BatchNorm layer over
// a stream of batches (Model::AccumulateStatistics), and the versions of the model they were
// measured on. Not model state: a failed or abandoned stream just drops it.
struct StatisticsAccumulator {
  std::vector<int> layers;              // BatchNorm layers adapted (node indices), in order
  std::vector<ChannelMoments> pooled;   // per entry of layers
  int64_t batches = 0;
  int64_t samples = 0;
  uint64_t params_version = 0;  // of the first batch
  uint64_t mode_version = 0;
  ForwardRecord scratch;        // reused between batches
};

class Model {
 public:
  // Validates config (optimizer, loss against the output shape, every layer) and builds.
  static Status Create(const ModelConfig& config, const Sequential::Limits& limits,
                       std::unique_ptr<Model>* out);

  const ModelConfig& config() const { return config_; }
  const Sequential& net() const { return *net_; }
  // The net to change in place. Its caller may write gradients, so the next TrainStep clears
  // them (see grads_zero_).
  Sequential& mutable_net() {
    grads_zero_ = false;
    return *net_;
  }

  bool training() const { return training_; }
  bool running_stats_frozen() const { return frozen_; }
  uint64_t step() const { return step_; }
  uint64_t params_version() const { return params_version_; }
  uint64_t mode_version() const { return mode_version_; }

  // Train or eval; freeze keeps the BatchNorm buffers fixed while training.
  void SetMode(bool training, bool freeze_running_stats);

  // Checks an input batch (shape, finiteness, BatchNorm's training rule) for a forward in the
  // given mode; with a data-parallel shard, x is a shard (it may have no rows) and the rule is
  // about the whole batch. Shared.
  Status CheckInput(const ConstTensorView& x, bool training,
                    const DataParallelShard& shard = {}) const;

  // A forward pass in the model's current mode, as module(x) in PyTorch: in train mode it
  // updates the BatchNorm running statistics (unless frozen) and advances dropout's generator.
  // REQUIRES: exclusive access when training(); shared access suffices in eval mode.
  Status Forward(const ConstTensorView& x, ForwardRecord* rec,
                 const DataParallelShard& shard = {});

  // Accumulates parameter gradients from a retained forward. FAILED_PRECONDITION when the
  // record is stale: the parameters changed or the mode switched since its forward ran.
  Status Backward(ForwardRecord* rec, const ConstTensorView& grad_output, Tensor* grad_input);

  // One optimizer step on the accumulated gradients: their total norm is measured (and, with
  // max_grad_norm, they are clipped as clip_grad_norm_ does), the optimizer steps at the
  // scheduled rate, the gradients are cleared and step increments.
  // FAILED_PRECONDITION, changing nothing, when a gradient is non-finite. With a collective
  // (data-parallel), the gradients are first summed over the ranks, so every replica measures,
  // clips and steps with the whole batch's (or refuses, all of them alike).
  Status ApplyGradients(StepResult* result, Collective* collective = nullptr);

  // Zero grads, forward in the current mode, loss, backward, then the step of ApplyGradients:
  // atomically. `scratch` is a record reused between calls to avoid allocation.
  Status TrainStep(const ConstTensorView& x, const Targets& targets, ForwardRecord* scratch,
                   TrainResult* result, const DataParallelShard& shard = {});

  // Loss and accuracy in eval semantics, changing nothing, whatever the mode. Shared.
  Status Evaluate(const ConstTensorView& x, const Targets& targets, ForwardRecord* scratch,
                  EvalResult* result, const DataParallelShard& shard = {}) const;

  // ---- Data-parallel training (core/collective.h) ----
  //
  // A job of N ranks holds one replica of the model per rank. For every batch, each rank calls
  // the same method (Forward, Backward, ApplyGradients, TrainStep, Evaluate) on its replica
  // with its own shard: rows [shard.row_offset, shard.row_offset + x.rows()) of a batch of
  // shard.global_rows rows (ShardRows: contiguous, sizes within one, possibly empty), targets
  // of the same rows, and for Backward the same rows of the output gradient. BatchNorm layers
  // that normalise with batch statistics use the whole batch's (SyncBatchNorm), Dropout draws
  // the whole batch's mask, the loss is the whole batch's mean and the gradients the whole
  // batch's: the replicas stay bit-identical to each other, and equal one model given the whole
  // batch up to the order of floating-point sums. TrainStep's result and Evaluate's figures are
  // the whole batch's on every rank.
  // REQUIRES: the whole batch passed CheckInput and ValidateTargets before it was split (a
  // check that failed on one shard only would leave the ranks apart mid-step; the shard's own
  // checks then cannot fail); every rank uses the same global_rows and collective.

  // Output of an eval-semantics forward without touching anything (not even the status).
  // Shared.
  Status Predict(const ConstTensorView& x, ForwardRecord* rec) const;

  // Replaces the optimizer's hyperparameters, schedule, clipping and parameter groups (see
  // Optimizer::UpdateConfig: a changed schedule starts again from step 0).
  Status UpdateOptimizer(const OptimizerConfig& config);
  // The rate the next optimizer step will use (the optimizer's lr, scheduled). Shared.
  double learning_rate() const { return optimizer_->learning_rate(); }

  // The state_dict; with include_optimizer also "optimizer.<param>.<slot>" entries and, with a
  // learning-rate schedule, "optimizer.lr_scheduler.last_epoch" (the steps taken under it).
  std::vector<NamedTensor> GetState(bool include_optimizer) const;
  // Validates every name, shape and value first (INVALID_ARGUMENT naming the entry), then
  // writes. strict: every state entry of the model (optimizer entries excepted) must be given.
  Status SetState(const std::vector<NamedTensor>& entries, bool strict);

  void ResetRunningStats();

  // Re-estimating BatchNorm statistics from data (AdaBN, "precise BN"), in two phases so a
  // stream of batches can fail or be abandoned without changing anything.
  //
  // AccumulateStatistics runs x through the model as in training — every BatchNorm layer
  // normalises with the batch's own statistics, Dropout is the identity — and merges the batch
  // moments of the values reaching each adapted layer into acc, exactly (Chan et al.'s pooled
  // mean and M2 in double, so the result is the statistics of all values of all batches, not
  // an average of per-batch figures). Adapted layers: BatchNorm with track_running_stats that
  // are not frozen (a frozen layer keeps its statistics and normalises with them). Nothing in
  // the model changes. FAILED_PRECONDITION on an inference-only model or one without an
  // adapted layer; the input checks of a training forward otherwise. Shared.
  Status AccumulateStatistics(const ConstTensorView& x, StatisticsAccumulator* acc) const;
  //
  // CommitStatistics replaces every adapted layer's running_mean / running_var with the pooled
  // mean and unbiased variance and adds acc.batches to its num_batches_tracked (as
  // torch.optim.swa_utils.update_bn, which runs one forward per batch). Weights, optimizer
  // state, step, mode and dropout generator are untouched. ABORTED, changing nothing, when the
  // parameters, the mode or a frozen flag changed since the first batch (the statistics would
  // mix two models); INVALID_ARGUMENT when acc holds no batch.
  Status CommitStatistics(const StatisticsAccumulator& acc);

  // Per-layer freezing and trainability, as fine-tuning does in PyTorch (`bn.eval()` in a
  // train-mode model, `requires_grad_(False)`). A change naming a residual block applies to
  // the layers inside it: frozen to those with running statistics, trainable to those with
  // parameters (as block.eval() and block.requires_grad_(False)). Validates every change
  // before applying any:
  // INVALID_ARGUMENT naming the label for an unknown label, a layer without parameters or
  // running statistics, or frozen=true on a layer without running statistics;
  // FAILED_PRECONDITION on an inference-only model. Changes apply in order (a later change of
  // the same layer wins). Making a layer untrainable discards its accumulated gradients.
  // Freezing or unfreezing makes earlier forwards stale (as a mode switch does); *frozen_changed
  // says whether that happened. The model-wide SetMode(freeze_running_stats) is independent:
  // it keeps train-mode batch statistics and only stops the running updates.
  Status SetLayerOptions(const std::vector<LayerOptionsChange>& changes, bool* frozen_changed);
  // Every layer with parameters or running statistics, nested ones included, in node order.
  // Shared.
  std::vector<LayerOptionsStatus> layer_options() const;
  // The node index of the layer labelled `label`: a configured name first, else a path ("3",
  // "4.body.1"). -1 when none.
  int FindLayer(const std::string& label) const;

  // An inference-only model (a FoldBatchNorm copy) stays in eval mode: switching to train
  // mode, TrainStep, Backward, ApplyGradients, retained forwards and layer options are
  // refused with FAILED_PRECONDITION (CheckCanTrain).
  bool inference_only() const { return inference_only_; }
  // REQUIRES: !training().
  void set_inference_only() { inference_only_ = true; }
  // FAILED_PRECONDITION naming `what` when the model is inference-only. Shared.
  Status CheckCanTrain(const char* what) const;

  // The BatchNorm layers whose statistics in rec's train-mode forward came from fewer than
  // `threshold` values per channel (batch statistics are then noisy; GroupNorm or LayerNorm do
  // not depend on the batch); a data-parallel shard counts the whole batch it normalised with.
  // Empty for eval-mode forwards and when threshold <= 0. Shared.
  std::vector<SmallBatchReport> SmallBatches(const ForwardRecord& rec, int64_t threshold) const;

  // Last drift figures per BatchNorm layer. Shared.
  std::vector<BatchNormStatus> batch_norm_status() const;

  // The dropout generator (checkpoints save it).
  Rng& rng() { return rng_; }
  void set_step(uint64_t step) { step_ = step; }

 private:
  Model() = default;
  void RecordStatus(const ForwardRecord& rec) const;
  // The gradient buckets of a data-parallel step, built at the first one.
  GradientBuckets* Buckets();
  // The forward context of the model's mode: batch statistics and dropout in train mode,
  // running-statistics updates unless frozen.
  ForwardContext CurrentModeContext();
  // Every named slot: the net's state, then (with include_optimizer) the optimizer's.
  std::vector<StateSlot> Slots(bool include_optimizer);
  // Sets *norm to the gradients' norm (GradNorm over the trainable parameters) and returns -1
  // when every gradient is finite, else the node index of the first layer with a non-finite
  // one. One pass over the gradients when they are finite.
  int CheckGradients(double* norm) const;
  // The commit half of a step, which cannot fail: clipping, optimizer step, gradients cleared,
  // counters advanced. REQUIRES: grad_norm from CheckGradients, which found them finite.
  StepResult Step(double grad_norm);
  // Sets every gradient to zero (and grads_zero_).
  void ZeroGradients();

  ModelConfig config_;
  std::unique_ptr<Sequential> net_;
  std::unique_ptr<Optimizer> optimizer_;
  Rng rng_;
  Tensor loss_grad_;  // dL/d(output) scratch for TrainStep
  std::unique_ptr<GradientBuckets> buckets_;  // null until a data-parallel step
  bool training_ = true;
  bool frozen_ = false;
  bool inference_only_ = false;
  std::vector<bool> trainable_mask_;  // Sequential::parameter_trainable(), kept current
  // Every gradient is zero (ZeroGradients ran, and no backward pass or mutable_net() since):
  // TrainStep, which starts from zero gradients, then skips a pass over them (3.4 % of the
  // reference MLP's step).
  bool grads_zero_ = false;
  uint64_t step_ = 0;
  uint64_t params_version_ = 0;
  uint64_t mode_version_ = 0;

  mutable std::mutex status_mu_;
  mutable std::vector<BatchNormStatus> status_;  // GUARDED_BY(status_mu_)
};

}  // namespace normd

#endif  // NORMD_CORE_MODEL_H_
