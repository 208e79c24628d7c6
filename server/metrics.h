// Metrics: the Prometheus series normd exports on its own HTTP port (path /metrics).
//
// The names are part of the contract (dashboards and alerts use them):
//   normd_rpc_duration_seconds{method,code}  histogram     normd_rpcs_total{method,code}
//   normd_samples_total{model,op}            op: forward | backward | train | evaluate
//   normd_train_steps_total{model}           normd_train_loss{model} (last TrainStep)
//   normd_grad_norm{model} (last optimizer step, before clipping)
//   normd_learning_rate{model} (of the next optimizer step)
//   normd_nonfinite_steps_total{model}       normd_models
//   normd_bn_mean_shift{model,layer,mode}    normd_bn_var_log_ratio{model,layer,mode}
//       histograms of the core's per-batch drift figures, mode: train | eval
//   normd_bn_running_mean_update_norm{model,layer}, normd_bn_running_var_update_norm{model,layer},
//   normd_bn_batches_tracked{model,layer}    gauges
//   normd_build_info{version}                process_* (resident memory, CPU, start time, fds)
// Everything is recorded once per RPC (or per stream message), never per element. Label values
// are model ids and layer names only, so the model limit bounds the cardinality; a model's series
// are removed with its ModelMetrics.
//
// Thread safety: every method may be called from any thread.
#ifndef NORMD_SERVER_METRICS_H_
#define NORMD_SERVER_METRICS_H_

#include <grpcpp/support/status.h>
#include <prometheus/counter.h>
#include <prometheus/exposer.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

#include <array>
#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "core/model.h"
#include "core/sequential.h"
#include "core/status.h"

namespace normd::server {

// The Trainer RPCs, as the `method` label spells them.
enum class Rpc {
  kCreateModel,
  kGetModel,
  kListModels,
  kDeleteModel,
  kSetMode,
  kForward,
  kBackward,
  kApplyGradients,
  kTrainStep,
  kTrainStream,
  kEvaluate,
  kGetState,
  kSetState,
  kResetRunningStats,
  kUpdateOptimizer,
  kSaveModel,
  kSetLayerOptions,
  kFoldBatchNorm,
  kAdaptStatistics,
};
constexpr int kNumRpcs = static_cast<int>(Rpc::kAdaptStatistics) + 1;
const char* RpcName(Rpc rpc);

// The `op` label of normd_samples_total.
enum class SampleOp { kForward, kBackward, kTrain, kEvaluate };

class Metrics;

// One model's series. Created by Metrics::AddModel; the destructor removes every series.
class ModelMetrics {
 public:
  ~ModelMetrics();
  ModelMetrics(const ModelMetrics&) = delete;
  ModelMetrics& operator=(const ModelMetrics&) = delete;

  void AddSamples(SampleOp op, int64_t n);
  // One optimizer step; `loss` is set by TrainStep (ApplyGradients has none). grad_norm: the
  // total gradient norm before clipping.
  void RecordStep(const double* loss, double grad_norm);
  // The rate of the model's next optimizer step (it changes with steps, UpdateOptimizer,
  // SetState of the schedule's progress).
  void SetLearningRate(double lr);
  void RecordNonFiniteStep();
  // Observes the drift figures of every BatchNorm layer a forward measured, under the label
  // mode=train when the forward used batch statistics semantics, eval otherwise.
  void RecordDrift(const ForwardRecord& rec, bool training);
  // Counts a training batch too small for a BatchNorm layer's statistics (normd_bn_small_batch_total).
  void RecordSmallBatch(int layer);
  // Sets the update-norm and num_batches_tracked gauges from the model's BatchNorm status.
  void SetBatchNormStatus(const std::vector<BatchNormStatus>& status);

 private:
  friend class Metrics;
  struct Layer {
    prometheus::Histogram* mean_shift[2] = {nullptr, nullptr};  // [train, eval]
    prometheus::Histogram* var_log_ratio[2] = {nullptr, nullptr};
    prometheus::Gauge* mean_update_norm = nullptr;
    prometheus::Gauge* var_update_norm = nullptr;
    prometheus::Gauge* batches_tracked = nullptr;
    prometheus::Counter* small_batches = nullptr;
  };
  explicit ModelMetrics(Metrics* owner) : owner_(owner) {}

  Metrics* owner_;
  std::array<prometheus::Counter*, 4> samples_{};
  prometheus::Counter* steps_ = nullptr;
  prometheus::Counter* nonfinite_ = nullptr;
  prometheus::Gauge* loss_ = nullptr;
  prometheus::Gauge* grad_norm_ = nullptr;
  prometheus::Gauge* learning_rate_ = nullptr;
  std::vector<int> layer_slot_;  // Sequential layer index -> index in layers_, or -1
  std::vector<Layer> layers_;
};

class Metrics {
 public:
  explicit Metrics(const std::string& version);
  ~Metrics();

  // Starts serving /metrics on "host:port" (port 0 picks a free one). UNAVAILABLE when the
  // address cannot be bound.
  Status Serve(const std::string& address);
  // The bound port, or 0 before Serve.
  int port() const;

  void RecordRpc(Rpc rpc, grpc::StatusCode code, double seconds);
  void SetModelCount(int n);

  // Creates the series of a model whose BatchNorm layers are those of `net`.
  std::unique_ptr<ModelMetrics> AddModel(const std::string& model_id, const Sequential& net);

  // The text exposition of everything registered (what a scrape returns).
  std::string Render() const;

 private:
  friend class ModelMetrics;
  struct RpcSeries {
    prometheus::Counter* count = nullptr;
    prometheus::Histogram* duration = nullptr;
  };
  static constexpr int kNumCodes = 17;

  std::shared_ptr<prometheus::Registry> registry_;
  std::shared_ptr<prometheus::Collectable> process_;
  std::unique_ptr<prometheus::Exposer> exposer_;

  prometheus::Family<prometheus::Histogram>& rpc_duration_;
  prometheus::Family<prometheus::Counter>& rpcs_;
  prometheus::Family<prometheus::Counter>& samples_;
  prometheus::Family<prometheus::Counter>& train_steps_;
  prometheus::Family<prometheus::Gauge>& train_loss_;
  prometheus::Family<prometheus::Gauge>& grad_norm_;
  prometheus::Family<prometheus::Gauge>& learning_rate_;
  prometheus::Family<prometheus::Counter>& nonfinite_steps_;
  prometheus::Family<prometheus::Gauge>& models_;
  prometheus::Family<prometheus::Histogram>& bn_mean_shift_;
  prometheus::Family<prometheus::Histogram>& bn_var_log_ratio_;
  prometheus::Family<prometheus::Gauge>& bn_mean_update_norm_;
  prometheus::Family<prometheus::Gauge>& bn_var_update_norm_;
  prometheus::Family<prometheus::Gauge>& bn_batches_tracked_;
  prometheus::Family<prometheus::Counter>& bn_small_batches_;
  prometheus::Gauge* models_gauge_;

  // Series per (method, code), created on first use.
  std::mutex rpc_mu_;
  std::array<std::array<std::atomic<RpcSeries*>, kNumCodes>, kNumRpcs> rpc_series_{};
  std::vector<std::unique_ptr<RpcSeries>> rpc_series_store_;  // GUARDED_BY(rpc_mu_)
};

}  // namespace normd::server

#endif  // NORMD_SERVER_METRICS_H_
