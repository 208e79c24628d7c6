// Metrics: the Prometheus series normd exports on its own HTTP port (path /metrics).
//
// The names are part of the contract (dashboards and alerts use them):
//   normd_rpc_duration_seconds{method,code}  histogram     normd_rpcs_total{method,code}
//   normd_samples_total{tenant,model,op}     op: forward | backward | train | evaluate
//   normd_train_steps_total{tenant,model}    normd_train_loss{tenant,model} (last TrainStep)
//   normd_grad_norm{tenant,model} (last optimizer step, before clipping)
//   normd_learning_rate{tenant,model} (of the next optimizer step)
//   normd_nonfinite_steps_total{tenant,model}  normd_models
//   normd_bn_mean_shift{tenant,model,layer,mode}  normd_bn_var_log_ratio{tenant,model,layer,mode}
//       histograms of the core's per-batch drift figures, mode: train | eval
//   normd_bn_running_mean_update_norm{tenant,model,layer},
//   normd_bn_running_var_update_norm{tenant,model,layer},
//   normd_bn_batches_tracked{tenant,model,layer}  gauges
//   normd_tenant_requests_total{tenant}      Trainer calls a tenant made (ended, any status)
//   normd_tenant_samples_total{tenant}       samples computed on a tenant's models
//   normd_tenant_refused_total{tenant}       a tenant's calls ended RESOURCE_EXHAUSTED (a quota
//                                            or limit refused them)
//   normd_world_size (ranks of the data-parallel job; 1 for a single process)
//   normd_dp_compute_seconds, normd_dp_collective_seconds  histograms per distributed model
//       operation (rank 0's view)   normd_dp_allreduce_bytes_total
//   normd_build_info{version}                process_* (resident memory, CPU, start time, fds)
// Everything is recorded once per RPC (or per stream message), never per element. Label values
// are tenant names, model ids and layer names only, so the model limit and the tenants bound the
// cardinality; a model's series are removed with its ModelMetrics, a tenant's stay.
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
#include <map>
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
  kCheckReplicas,
};
constexpr int kNumRpcs = static_cast<int>(Rpc::kCheckReplicas) + 1;
const char* RpcName(Rpc rpc);

// The `op` label of normd_samples_total.
enum class SampleOp { kForward, kBackward, kTrain, kEvaluate };

class Metrics;

// One tenant's series. Created by Metrics::Tenant, owned by Metrics, never removed.
class TenantMetrics {
 public:
  // One finished Trainer call of the tenant, with its status.
  void RecordCall(grpc::StatusCode code);
  void AddSamples(int64_t n) { samples_->Increment(static_cast<double>(n)); }

 private:
  friend class Metrics;
  prometheus::Counter* requests_ = nullptr;
  prometheus::Counter* samples_ = nullptr;
  prometheus::Counter* refused_ = nullptr;
};

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
  ModelMetrics(Metrics* owner, TenantMetrics* tenant) : owner_(owner), tenant_(tenant) {}

  Metrics* owner_;
  TenantMetrics* tenant_;  // may be null
  std::array<prometheus::Counter*, 4> samples_{};
  prometheus::Counter* steps_ = nullptr;
  prometheus::Counter* nonfinite_ = nullptr;
  prometheus::Gauge* loss_ = nullptr;
  prometheus::Gauge* grad_norm_ = nullptr;
  prometheus::Gauge* learning_rate_ = nullptr;
  std::vector<int> layer_slot_;  // Sequential node index -> index in layers_, or -1
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
  // normd_world_size: ranks of the data-parallel job (1 for a single process, the default).
  void SetWorldSize(int n);
  // A data-parallel job's model operation as rank 0 saw it (server/data_parallel.h): seconds
  // computing and seconds in collectives (normd_dp_compute_seconds,
  // normd_dp_collective_seconds histograms), and the bytes it all-reduced
  // (normd_dp_allreduce_bytes_total).
  void RecordDataParallelStep(double compute_seconds, double collective_seconds, double bytes);

  // Creates the series of tenant `tenant`'s model `model_id`, whose BatchNorm layers are those
  // of `net`, nested ones included (every series is labelled tenant and model; a BatchNorm's
  // also layer, its node label: its name or its path, "4.body.1"); its samples also count in
  // `tenant_metrics` (may be null).
  std::unique_ptr<ModelMetrics> AddModel(const std::string& tenant, const std::string& model_id,
                                         TenantMetrics* tenant_metrics, const Sequential& net);

  // The series of `tenant`, created on first use. The pointer stays valid as long as Metrics.
  TenantMetrics* Tenant(const std::string& tenant);

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
  prometheus::Family<prometheus::Counter>& tenant_requests_;
  prometheus::Family<prometheus::Counter>& tenant_samples_;
  prometheus::Family<prometheus::Counter>& tenant_refused_;
  prometheus::Gauge* models_gauge_;
  prometheus::Gauge* world_size_gauge_ = nullptr;
  prometheus::Histogram* dp_compute_ = nullptr;
  prometheus::Histogram* dp_collective_ = nullptr;
  prometheus::Counter* dp_bytes_ = nullptr;

  std::mutex tenants_mu_;
  std::map<std::string, std::unique_ptr<TenantMetrics>> tenants_;  // GUARDED_BY(tenants_mu_)

  // Series per (method, code), created on first use.
  std::mutex rpc_mu_;
  std::array<std::array<std::atomic<RpcSeries*>, kNumCodes>, kNumRpcs> rpc_series_{};
  std::vector<std::unique_ptr<RpcSeries>> rpc_series_store_;  // GUARDED_BY(rpc_mu_)
};

}  // namespace normd::server

#endif  // NORMD_SERVER_METRICS_H_
