#include "server/metrics.h"

#include <dirent.h>
#include <prometheus/collectable.h>
#include <prometheus/metric_family.h>
#include <prometheus/text_serializer.h>
#include <unistd.h>

#include <fstream>
#include <sstream>

#include "server/status_map.h"

namespace normd::server {
namespace {

const prometheus::Histogram::BucketBoundaries& RpcBuckets() {
  static const prometheus::Histogram::BucketBoundaries b = {
      0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
      0.025,   0.05,   0.1,     0.25,   0.5,   1.0,    2.5,   5.0,  10.0};
  return b;
}

// Drift figures are in units of running standard deviations (mean shift) or natural-log
// ratios (variance): 0.1 is noise, 1 is a shift an operator wants to hear about.
const prometheus::Histogram::BucketBoundaries& DriftBuckets() {
  static const prometheus::Histogram::BucketBoundaries b = {0.01, 0.025, 0.05, 0.1, 0.25,
                                                            0.5,  1.0,   2.5,  5.0, 10.0};
  return b;
}

const char* SampleOpName(SampleOp op) {
  switch (op) {
    case SampleOp::kForward: return "forward";
    case SampleOp::kBackward: return "backward";
    case SampleOp::kTrain: return "train";
    case SampleOp::kEvaluate: return "evaluate";
  }
  return "?";
}

// process_* metrics from /proc/self, which prometheus-cpp 1.0 does not provide.
class ProcessCollector : public prometheus::Collectable {
 public:
  std::vector<prometheus::MetricFamily> Collect() const override {
    std::vector<prometheus::MetricFamily> out;
    const double ticks = static_cast<double>(sysconf(_SC_CLK_TCK));
    const double page = static_cast<double>(sysconf(_SC_PAGESIZE));
    std::ifstream stat_file("/proc/self/stat");
    std::string stat((std::istreambuf_iterator<char>(stat_file)), std::istreambuf_iterator<char>());
    // Fields after the command name, which is in parentheses and may contain spaces.
    const size_t close = stat.rfind(')');
    if (close != std::string::npos && ticks > 0) {
      std::istringstream rest(stat.substr(close + 2));
      std::vector<std::string> f;
      for (std::string tok; rest >> tok;) f.push_back(tok);
      // f[0] is field 3 (state): utime is field 14, stime 15, starttime 22, vsize 23, rss 24.
      if (f.size() > 21) {
        const double cpu = (std::stod(f[11]) + std::stod(f[12])) / ticks;
        out.push_back(Family("process_cpu_seconds_total",
                             "Total user and system CPU time spent in seconds.",
                             prometheus::MetricType::Counter, cpu));
        const double boot = BootTime();
        if (boot > 0) {
          out.push_back(Family("process_start_time_seconds",
                               "Start time of the process since unix epoch in seconds.",
                               prometheus::MetricType::Gauge, boot + std::stod(f[19]) / ticks));
        }
        out.push_back(Family("process_virtual_memory_bytes", "Virtual memory size in bytes.",
                             prometheus::MetricType::Gauge, std::stod(f[20])));
        out.push_back(Family("process_resident_memory_bytes", "Resident memory size in bytes.",
                             prometheus::MetricType::Gauge, std::stod(f[21]) * page));
      }
    }
    if (DIR* dir = opendir("/proc/self/fd")) {
      int n = 0;
      while (const dirent* e = readdir(dir)) {
        if (e->d_name[0] != '.') ++n;
      }
      closedir(dir);
      out.push_back(Family("process_open_fds", "Number of open file descriptors.",
                           prometheus::MetricType::Gauge, n - 1));  // minus the one reading
    }
    return out;
  }

 private:
  static prometheus::MetricFamily Family(const char* name, const char* help,
                                         prometheus::MetricType type, double value) {
    prometheus::MetricFamily f;
    f.name = name;
    f.help = help;
    f.type = type;
    prometheus::ClientMetric m;
    if (type == prometheus::MetricType::Counter) {
      m.counter.value = value;
    } else {
      m.gauge.value = value;
    }
    f.metric.push_back(m);
    return f;
  }

  static double BootTime() {
    std::ifstream in("/proc/stat");
    for (std::string line; std::getline(in, line);) {
      if (line.rfind("btime ", 0) == 0) return std::stod(line.substr(6));
    }
    return 0;
  }
};

}  // namespace

const char* RpcName(Rpc rpc) {
  switch (rpc) {
    case Rpc::kCreateModel: return "CreateModel";
    case Rpc::kGetModel: return "GetModel";
    case Rpc::kListModels: return "ListModels";
    case Rpc::kDeleteModel: return "DeleteModel";
    case Rpc::kSetMode: return "SetMode";
    case Rpc::kForward: return "Forward";
    case Rpc::kBackward: return "Backward";
    case Rpc::kApplyGradients: return "ApplyGradients";
    case Rpc::kTrainStep: return "TrainStep";
    case Rpc::kTrainStream: return "TrainStream";
    case Rpc::kEvaluate: return "Evaluate";
    case Rpc::kGetState: return "GetState";
    case Rpc::kSetState: return "SetState";
    case Rpc::kResetRunningStats: return "ResetRunningStats";
    case Rpc::kUpdateOptimizer: return "UpdateOptimizer";
    case Rpc::kSaveModel: return "SaveModel";
    case Rpc::kSetLayerOptions: return "SetLayerOptions";
    case Rpc::kFoldBatchNorm: return "FoldBatchNorm";
    case Rpc::kAdaptStatistics: return "AdaptStatistics";
    case Rpc::kCheckReplicas: return "CheckReplicas";
  }
  return "?";
}

// --- ModelMetrics ------------------------------------------------------------------------------

ModelMetrics::~ModelMetrics() {
  Metrics& m = *owner_;
  for (int i = 0; i < 4; ++i) m.samples_.Remove(samples_[i]);
  m.train_steps_.Remove(steps_);
  m.nonfinite_steps_.Remove(nonfinite_);
  m.train_loss_.Remove(loss_);
  m.grad_norm_.Remove(grad_norm_);
  m.learning_rate_.Remove(learning_rate_);
  for (Layer& l : layers_) {
    for (int k = 0; k < 2; ++k) {
      if (l.mean_shift[k] != nullptr) m.bn_mean_shift_.Remove(l.mean_shift[k]);
      if (l.var_log_ratio[k] != nullptr) m.bn_var_log_ratio_.Remove(l.var_log_ratio[k]);
    }
    m.bn_mean_update_norm_.Remove(l.mean_update_norm);
    m.bn_var_update_norm_.Remove(l.var_update_norm);
    m.bn_batches_tracked_.Remove(l.batches_tracked);
    m.bn_small_batches_.Remove(l.small_batches);
  }
}

void ModelMetrics::AddSamples(SampleOp op, int64_t n) {
  samples_[static_cast<int>(op)]->Increment(static_cast<double>(n));
  if (tenant_ != nullptr) tenant_->AddSamples(n);
}

void TenantMetrics::RecordCall(grpc::StatusCode code) {
  requests_->Increment();
  if (code == grpc::StatusCode::RESOURCE_EXHAUSTED) refused_->Increment();
}

void ModelMetrics::RecordStep(const double* loss, double grad_norm) {
  steps_->Increment();
  if (loss != nullptr) loss_->Set(*loss);
  grad_norm_->Set(grad_norm);
}

void ModelMetrics::SetLearningRate(double lr) { learning_rate_->Set(lr); }

void ModelMetrics::RecordNonFiniteStep() { nonfinite_->Increment(); }

void ModelMetrics::RecordDrift(const ForwardRecord& rec, bool training) {
  const int mode = training ? 0 : 1;
  for (const ForwardRecord::BatchNormReport& r : rec.batch_norms()) {
    if (!r.drift.valid || r.layer < 0 || r.layer >= static_cast<int>(layer_slot_.size())) continue;
    const int slot = layer_slot_[r.layer];
    if (slot < 0) continue;
    layers_[slot].mean_shift[mode]->Observe(r.drift.mean_shift);
    layers_[slot].var_log_ratio[mode]->Observe(r.drift.var_log_ratio);
  }
}

void ModelMetrics::RecordSmallBatch(int layer) {
  if (layer < 0 || layer >= static_cast<int>(layer_slot_.size())) return;
  const int slot = layer_slot_[layer];
  if (slot >= 0) layers_[slot].small_batches->Increment();
}

void ModelMetrics::SetBatchNormStatus(const std::vector<BatchNormStatus>& status) {
  for (const BatchNormStatus& s : status) {
    if (s.layer < 0 || s.layer >= static_cast<int>(layer_slot_.size())) continue;
    const int slot = layer_slot_[s.layer];
    if (slot < 0) continue;
    layers_[slot].mean_update_norm->Set(s.running_mean_update_norm);
    layers_[slot].var_update_norm->Set(s.running_var_update_norm);
    layers_[slot].batches_tracked->Set(static_cast<double>(s.num_batches_tracked));
  }
}

// --- Metrics -----------------------------------------------------------------------------------

Metrics::Metrics(const std::string& version)
    : registry_(std::make_shared<prometheus::Registry>()),
      process_(std::make_shared<ProcessCollector>()),
      rpc_duration_(prometheus::BuildHistogram()
                        .Name("normd_rpc_duration_seconds")
                        .Help("Time from receiving an RPC to its status, by method and code.")
                        .Register(*registry_)),
      rpcs_(prometheus::BuildCounter()
                .Name("normd_rpcs_total")
                .Help("RPCs completed, by method and status code.")
                .Register(*registry_)),
      samples_(prometheus::BuildCounter()
                   .Name("normd_samples_total")
                   .Help("Samples processed, by model and op (forward, backward, train, "
                         "evaluate); throughput is its rate.")
                   .Register(*registry_)),
      train_steps_(prometheus::BuildCounter()
                       .Name("normd_train_steps_total")
                       .Help("Optimizer steps applied (TrainStep and ApplyGradients).")
                       .Register(*registry_)),
      train_loss_(prometheus::BuildGauge()
                      .Name("normd_train_loss")
                      .Help("Loss of the model's last TrainStep.")
                      .Register(*registry_)),
      grad_norm_(prometheus::BuildGauge()
                     .Name("normd_grad_norm")
                     .Help("Total 2-norm of the gradients of the model's last optimizer step, "
                           "before clipping (clip_grad_norm_'s return value).")
                     .Register(*registry_)),
      learning_rate_(prometheus::BuildGauge()
                         .Name("normd_learning_rate")
                         .Help("Learning rate of the model's next optimizer step (the "
                               "optimizer's lr, scheduled).")
                         .Register(*registry_)),
      nonfinite_steps_(prometheus::BuildCounter()
                           .Name("normd_nonfinite_steps_total")
                           .Help("Steps refused because the loss or a gradient was not finite "
                                 "(the model was left unchanged).")
                           .Register(*registry_)),
      models_(prometheus::BuildGauge()
                  .Name("normd_models")
                  .Help("Models currently held by the server.")
                  .Register(*registry_)),
      bn_mean_shift_(prometheus::BuildHistogram()
                         .Name("normd_bn_mean_shift")
                         .Help("Per batch and BatchNorm layer: mean over channels of "
                               "|batch_mean - running_mean| / sqrt(running_var + eps).")
                         .Register(*registry_)),
      bn_var_log_ratio_(prometheus::BuildHistogram()
                            .Name("normd_bn_var_log_ratio")
                            .Help("Per batch and BatchNorm layer: mean over channels of "
                                  "|ln((batch_var + eps) / (running_var + eps))|.")
                            .Register(*registry_)),
      bn_mean_update_norm_(prometheus::BuildGauge()
                               .Name("normd_bn_running_mean_update_norm")
                               .Help("L2 norm of the last update to a BatchNorm layer's "
                                     "running_mean.")
                               .Register(*registry_)),
      bn_var_update_norm_(prometheus::BuildGauge()
                              .Name("normd_bn_running_var_update_norm")
                              .Help("L2 norm of the last update to a BatchNorm layer's "
                                    "running_var.")
                              .Register(*registry_)),
      bn_batches_tracked_(prometheus::BuildGauge()
                              .Name("normd_bn_batches_tracked")
                              .Help("A BatchNorm layer's num_batches_tracked.")
                              .Register(*registry_)),
      bn_small_batches_(prometheus::BuildCounter()
                            .Name("normd_bn_small_batch_total")
                            .Help("Training batches a BatchNorm layer normalised with statistics "
                                  "over fewer values per channel than --small-batch-threshold.")
                            .Register(*registry_)),
      tenant_requests_(prometheus::BuildCounter()
                           .Name("normd_tenant_requests_total")
                           .Help("Trainer calls a tenant made, ended with any status.")
                           .Register(*registry_)),
      tenant_samples_(prometheus::BuildCounter()
                          .Name("normd_tenant_samples_total")
                          .Help("Samples computed on a tenant's models (every op).")
                          .Register(*registry_)),
      tenant_refused_(prometheus::BuildCounter()
                          .Name("normd_tenant_refused_total")
                          .Help("A tenant's calls refused with RESOURCE_EXHAUSTED (its quotas, "
                                "or a server or model limit).")
                          .Register(*registry_)),
      models_gauge_(&models_.Add({})) {
  prometheus::BuildGauge()
      .Name("normd_build_info")
      .Help("Always 1; the label carries the normd version.")
      .Register(*registry_)
      .Add({{"version", version}})
      .Set(1);
  world_size_gauge_ = &prometheus::BuildGauge()
                           .Name("normd_world_size")
                           .Help("Ranks of the data-parallel job (mpirun -np N); 1 for a single "
                                 "process.")
                           .Register(*registry_)
                           .Add({});
  world_size_gauge_->Set(1);
  const prometheus::Histogram::BucketBoundaries step_buckets = {
      1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1, 3, 10};
  dp_compute_ = &prometheus::BuildHistogram()
                     .Name("normd_dp_compute_seconds")
                     .Help("Data-parallel jobs: seconds rank 0 computed in one distributed model "
                           "operation (TrainStep, train-mode Forward, Backward, ApplyGradients), "
                           "its collectives excluded.")
                     .Register(*registry_)
                     .Add({}, step_buckets);
  dp_collective_ = &prometheus::BuildHistogram()
                        .Name("normd_dp_collective_seconds")
                        .Help("Data-parallel jobs: seconds rank 0 spent in collectives (all-reduce, "
                              "all-gather) in one distributed model operation, waiting for the "
                              "other ranks included.")
                        .Register(*registry_)
                        .Add({}, step_buckets);
  dp_bytes_ = &prometheus::BuildCounter()
                   .Name("normd_dp_allreduce_bytes_total")
                   .Help("Data-parallel jobs: bytes rank 0 contributed to all-reduces and "
                         "all-gathers (gradients, BatchNorm statistics, losses).")
                   .Register(*registry_)
                   .Add({});
  for (auto& row : rpc_series_) {
    for (auto& cell : row) cell.store(nullptr, std::memory_order_relaxed);
  }
}

Metrics::~Metrics() = default;

Status Metrics::Serve(const std::string& address) {
  try {
    exposer_ = std::make_unique<prometheus::Exposer>(address, /*num_threads=*/1);
  } catch (const std::exception& e) {
    return Status(StatusCode::kUnavailable,
                  StrCat("cannot serve metrics on ", address, ": ", e.what()));
  }
  exposer_->RegisterCollectable(registry_);
  exposer_->RegisterCollectable(process_);
  return Status::Ok();
}

int Metrics::port() const {
  if (exposer_ == nullptr) return 0;
  const std::vector<int> ports = exposer_->GetListeningPorts();
  return ports.empty() ? 0 : ports.front();
}

void Metrics::RecordRpc(Rpc rpc, grpc::StatusCode code, double seconds) {
  int c = static_cast<int>(code);
  if (c < 0 || c >= kNumCodes) c = static_cast<int>(grpc::StatusCode::UNKNOWN);
  std::atomic<RpcSeries*>& cell = rpc_series_[static_cast<int>(rpc)][c];
  RpcSeries* s = cell.load(std::memory_order_acquire);
  if (s == nullptr) {
    std::lock_guard<std::mutex> lock(rpc_mu_);
    s = cell.load(std::memory_order_acquire);
    if (s == nullptr) {
      const prometheus::Labels labels = {{"method", RpcName(rpc)},
                                         {"code", GrpcCodeName(static_cast<grpc::StatusCode>(c))}};
      auto owned = std::make_unique<RpcSeries>();
      owned->count = &rpcs_.Add(labels);
      owned->duration = &rpc_duration_.Add(labels, RpcBuckets());
      s = owned.get();
      rpc_series_store_.push_back(std::move(owned));
      cell.store(s, std::memory_order_release);
    }
  }
  s->count->Increment();
  s->duration->Observe(seconds);
}

void Metrics::SetModelCount(int n) { models_gauge_->Set(n); }

void Metrics::SetWorldSize(int n) { world_size_gauge_->Set(n); }

void Metrics::RecordDataParallelStep(double compute_seconds, double collective_seconds,
                                     double bytes) {
  dp_compute_->Observe(compute_seconds);
  dp_collective_->Observe(collective_seconds);
  dp_bytes_->Increment(bytes);
}

TenantMetrics* Metrics::Tenant(const std::string& tenant) {
  std::lock_guard<std::mutex> lock(tenants_mu_);
  std::unique_ptr<TenantMetrics>& t = tenants_[tenant];
  if (t == nullptr) {
    t = std::make_unique<TenantMetrics>();
    const prometheus::Labels labels = {{"tenant", tenant}};
    t->requests_ = &tenant_requests_.Add(labels);
    t->samples_ = &tenant_samples_.Add(labels);
    t->refused_ = &tenant_refused_.Add(labels);
  }
  return t.get();
}

std::unique_ptr<ModelMetrics> Metrics::AddModel(const std::string& tenant,
                                                const std::string& model_id,
                                                TenantMetrics* tenant_metrics,
                                                const Sequential& net) {
  std::unique_ptr<ModelMetrics> m(new ModelMetrics(this, tenant_metrics));
  const prometheus::Labels model = {{"tenant", tenant}, {"model", model_id}};
  auto with = [&model](std::initializer_list<std::pair<const std::string, std::string>> more) {
    prometheus::Labels l = model;
    l.insert(more);
    return l;
  };
  for (SampleOp op : {SampleOp::kForward, SampleOp::kBackward, SampleOp::kTrain,
                      SampleOp::kEvaluate}) {
    m->samples_[static_cast<int>(op)] = &samples_.Add(with({{"op", SampleOpName(op)}}));
  }
  m->steps_ = &train_steps_.Add(model);
  m->nonfinite_ = &nonfinite_steps_.Add(model);
  m->loss_ = &train_loss_.Add(model);
  m->grad_norm_ = &grad_norm_.Add(model);
  m->learning_rate_ = &learning_rate_.Add(model);
  m->layer_slot_.assign(net.num_nodes(), -1);
  for (int i = 0; i < net.num_nodes(); ++i) {
    const BatchNorm* bn = net.node(i).layer->AsBatchNorm();
    if (bn == nullptr) continue;
    const std::string& name = net.node(i).label;
    ModelMetrics::Layer l;
    const char* modes[2] = {"train", "eval"};
    if (bn->tracks_running_stats()) {  // without running statistics there is no drift
      for (int k = 0; k < 2; ++k) {
        const prometheus::Labels labels = with({{"layer", name}, {"mode", modes[k]}});
        l.mean_shift[k] = &bn_mean_shift_.Add(labels, DriftBuckets());
        l.var_log_ratio[k] = &bn_var_log_ratio_.Add(labels, DriftBuckets());
      }
    }
    const prometheus::Labels labels = with({{"layer", name}});
    l.mean_update_norm = &bn_mean_update_norm_.Add(labels);
    l.var_update_norm = &bn_var_update_norm_.Add(labels);
    l.batches_tracked = &bn_batches_tracked_.Add(labels);
    l.small_batches = &bn_small_batches_.Add(labels);
    m->layer_slot_[i] = static_cast<int>(m->layers_.size());
    m->layers_.push_back(l);
  }
  return m;
}

std::string Metrics::Render() const {
  std::vector<prometheus::MetricFamily> families = registry_->Collect();
  for (prometheus::MetricFamily& f : process_->Collect()) families.push_back(std::move(f));
  return prometheus::TextSerializer().Serialize(families);
}

}  // namespace normd::server
