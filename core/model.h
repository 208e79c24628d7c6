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
#include <string>
#include <vector>

#include "core/config.h"
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

// What the service reports per BatchNorm layer.
struct BatchNormStatus {
  int layer = 0;
  std::string name;  // the layer's label
  int64_t num_batches_tracked = 0;
  float last_mean_shift = 0.0f;
  float last_var_log_ratio = 0.0f;
  float running_mean_update_norm = 0.0f;
  float running_var_update_norm = 0.0f;
};

struct TrainResult {
  double loss = 0.0;
  uint64_t step = 0;
  int64_t samples = 0;
};

struct EvalResult {
  double loss = 0.0;
  double accuracy = 0.0;  // cross-entropy only; 0 otherwise
  int64_t samples = 0;
};

class Model {
 public:
  // Validates config (optimizer, loss against the output shape, every layer) and builds.
  static Status Create(const ModelConfig& config, const Sequential::Limits& limits,
                       std::unique_ptr<Model>* out);

  const ModelConfig& config() const { return config_; }
  Sequential& net() { return *net_; }
  const Sequential& net() const { return *net_; }

  bool training() const { return training_; }
  bool running_stats_frozen() const { return frozen_; }
  uint64_t step() const { return step_; }
  uint64_t params_version() const { return params_version_; }
  uint64_t mode_version() const { return mode_version_; }

  // Train or eval; freeze keeps the BatchNorm buffers fixed while training.
  void SetMode(bool training, bool freeze_running_stats);

  // Checks an input batch (shape, finiteness, BatchNorm's training rule) for a forward in the
  // given mode. Shared.
  Status CheckInput(const ConstTensorView& x, bool training) const;

  // A forward pass in the model's current mode, as module(x) in PyTorch: in train mode it
  // updates the BatchNorm running statistics (unless frozen) and advances dropout's generator.
  // REQUIRES: exclusive access when training(); shared access suffices in eval mode.
  Status Forward(const ConstTensorView& x, ForwardRecord* rec);

  // Accumulates parameter gradients from a retained forward. FAILED_PRECONDITION when the
  // record is stale: the parameters changed or the mode switched since its forward ran.
  Status Backward(ForwardRecord* rec, const ConstTensorView& grad_output, Tensor* grad_input);

  // Runs the optimizer on the accumulated gradients, clears them and increments step.
  // FAILED_PRECONDITION, changing nothing, when a gradient is non-finite.
  Status ApplyGradients(uint64_t* step);

  // Zero grads, forward in the current mode, loss, backward, optimizer step: atomically.
  // `scratch` is a record reused between calls to avoid allocation.
  Status TrainStep(const ConstTensorView& x, const Targets& targets, ForwardRecord* scratch,
                   TrainResult* result);

  // Loss and accuracy in eval semantics, changing nothing, whatever the mode. Shared.
  Status Evaluate(const ConstTensorView& x, const Targets& targets, ForwardRecord* scratch,
                  EvalResult* result) const;

  // Output of an eval-semantics forward without touching anything (not even the status).
  // Shared.
  Status Predict(const ConstTensorView& x, ForwardRecord* rec) const;

  Status UpdateOptimizer(const OptimizerConfig& config);

  // The state_dict; with include_optimizer also "optimizer.<param>.<slot>" entries.
  std::vector<NamedTensor> GetState(bool include_optimizer) const;
  // Validates every name, shape and value first (INVALID_ARGUMENT naming the entry), then
  // writes. strict: every state entry of the model (optimizer entries excepted) must be given.
  Status SetState(const std::vector<NamedTensor>& entries, bool strict);

  void ResetRunningStats();

  // Last drift figures per BatchNorm layer. Shared.
  std::vector<BatchNormStatus> batch_norm_status() const;

  // The dropout generator (checkpoints save it).
  Rng& rng() { return rng_; }
  void set_step(uint64_t step) { step_ = step; }

 private:
  Model() = default;
  void RecordStatus(const ForwardRecord& rec) const;
  // The forward context of the model's mode: batch statistics and dropout in train mode,
  // running-statistics updates unless frozen.
  ForwardContext CurrentModeContext();
  // Every named slot: the net's state, then (with include_optimizer) the optimizer's.
  std::vector<StateSlot> Slots(bool include_optimizer);

  ModelConfig config_;
  std::unique_ptr<Sequential> net_;
  std::unique_ptr<Optimizer> optimizer_;
  Rng rng_;
  Tensor loss_grad_;  // dL/d(output) scratch for TrainStep
  bool training_ = true;
  bool frozen_ = false;
  uint64_t step_ = 0;
  uint64_t params_version_ = 0;
  uint64_t mode_version_ = 0;

  mutable std::mutex status_mu_;
  mutable std::vector<BatchNormStatus> status_;  // GUARDED_BY(status_mu_)
};

}  // namespace normd

#endif  // NORMD_CORE_MODEL_H_
