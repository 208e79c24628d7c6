// Registry: the models a server holds, by tenant and id (server/tenant.h), and ModelEntry: one model with everything the
// service keeps beside it (its wire spec, a per-model work queue, retained forwards, metrics and
// a summary readable without waiting for the model).
//
// Model ids are 1 to 64 characters of [A-Za-z0-9._-], not starting with '.' (they name files in
// the data directory). An empty requested id makes the server pick one ("m-" and 12 hex digits).
//
// Concurrency. Each entry has a std::shared_mutex guarding the model and its spec: eval-mode
// forwards, Evaluate, GetState, SaveModel and FoldBatchNorm take it shared; train-mode
// forwards, Backward, ApplyGradients, TrainStep, SetMode, SetState, ResetRunningStats,
// UpdateOptimizer, SetLayerOptions and Delete take it exclusively. Requests do not wait on that
// mutex in a thread: ModelEntry::Schedule queues them per model (FIFO) and hands a task to the
// ComputePool only when the access it needs is free, so the mutex is uncontended for requests
// and pool threads never block on it; requests to different models run in parallel, eval-mode
// forwards of one model run together.
// GetModel and ListModels read a summary published after each change and never wait at all.
//
// Tenants. Each model belongs to a tenant; the registry keys models by (tenant, id) and
// enforces each tenant's quotas (RegistryLimits::tenant_*): models held, parameters of all its
// models together, and requests queued or running on its models. Work is handed to the
// ComputePool as the model's tenant's, which serves tenants round-robin.
#ifndef NORMD_SERVER_REGISTRY_H_
#define NORMD_SERVER_REGISTRY_H_

#include <atomic>
#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <shared_mutex>
#include <string>
#include <vector>

#include "core/model.h"
#include "core/sequential.h"
#include "core/status.h"
#include "normd/v1/normd.pb.h"
#include "server/compute_pool.h"
#include "server/convert.h"
#include "server/metrics.h"
#include "server/persistence.h"
#include "server/tenant.h"

namespace normd::server {

struct RegistryLimits {
  int max_models = 64;
  int64_t max_parameters = int64_t{16} << 20;
  // Largest tensor of a batch: request tensors and N x (the largest per-sample activation).
  int64_t max_batch_elements = int64_t{16} << 20;
  int max_layers = 256;
  int max_retained_forwards = 16;  // per model
  std::chrono::milliseconds retained_forward_timeout{std::chrono::seconds(60)};
  int max_queued_per_model = 64;  // requests waiting or running per model
  // Not a limit but the same kind of per-server setting: a training batch whose BatchNorm
  // statistics come from fewer values per channel than this earns a SmallBatchWarning in the
  // response and a count in normd_bn_small_batch_total. 0: never.
  int64_t small_batch_threshold = 16;
  // Also a setting: ranks of the data-parallel job holding every model (Model.world_size).
  int world_size = 1;
  // Per-tenant quotas: models held, parameters of all the tenant's models together, requests
  // queued or running on the tenant's models together.
  int tenant_max_models = 64;
  int64_t tenant_max_parameters = int64_t{16} << 26;
  int tenant_max_queued = 64 * 64;
};

// One tenant's holdings and requests in flight, for its quotas and its series. Shared by the
// registry and the tenant's entries.
struct TenantUsage {
  explicit TenantUsage(std::string name) : tenant(std::move(name)) {}
  const std::string tenant;
  int models = 0;          // held or being created; GUARDED_BY(Registry::mu_)
  int64_t parameters = 0;  // of those models; GUARDED_BY(Registry::mu_)
  std::atomic<int> in_flight{0};  // requests queued or running on its models
  TenantMetrics* metrics = nullptr;  // owned by Metrics; null without metrics
};

// INVALID_ARGUMENT unless `id` is a valid model id (see above). `field` names it in messages.
Status ValidateModelId(const std::string& id, const std::string& field);

class ModelEntry {
 public:
  enum class Access { kShared, kExclusive };
  // A forward's access depends on the model's mode when it reaches the front of the queue.
  enum class Want { kShared, kExclusive, kByMode };

  ModelEntry(std::shared_ptr<TenantUsage> tenant, std::string id, v1::ModelSpec spec,
             std::unique_ptr<Model> model, std::unique_ptr<ModelMetrics> metrics,
             const RegistryLimits& limits, ComputePool* pool);
  // Frees the model and hands the freed heap back to the OS (malloc_trim): a deleted model's
  // parameters and batch buffers are megabytes that glibc would otherwise keep.
  ~ModelEntry();
  ModelEntry(const ModelEntry&) = delete;
  ModelEntry& operator=(const ModelEntry&) = delete;

  // The id within the tenant's namespace.
  const std::string& id() const { return id_; }
  const std::string& tenant() const { return tenant_->tenant; }
  // For logs and admins: DisplayName(tenant, id) ("mlp", or "b/mlp" outside the default tenant).
  const std::string& name() const { return name_; }
  TenantUsage& usage() { return *tenant_; }

  // --- Guarded by mu() ---------------------------------------------------------------------
  std::shared_mutex& mu() { return mu_; }
  Model& model() { return *model_; }
  const v1::ModelSpec& spec() const { return spec_; }
  // UpdateOptimizer: the spec reports the new hyperparameters. REQUIRES: mu() exclusive.
  void SetOptimizerSpec(const v1::OptimizerSpec& optimizer);
  // True once Delete removed the model; work still queued then answers NOT_FOUND.
  bool deleted() const { return deleted_; }
  void set_deleted() { deleted_ = true; }
  // Backward calls whose gradients await ApplyGradients.
  int64_t pending_backwards = 0;
  // Incremented with every change of the model's state (the persistence layer's dirty mark).
  uint64_t mutations = 0;
  // Scratch record for TrainStep (exclusive access only).
  ForwardRecord train_record;
  // The model's series; null after Delete.
  ModelMetrics* metrics() { return metrics_.get(); }
  void DropMetrics() { metrics_.reset(); }

  // Immutable after construction.
  int64_t max_sample_elements() const { return max_sample_elements_; }
  // An upper bound of the multiply-adds of one sample's forward (parameters times the spatial
  // positions they are applied at, plus every output element), to tell tiny requests apart.
  int64_t forward_cost_per_sample() const { return forward_cost_per_sample_; }

  // --- Scheduling ----------------------------------------------------------------------------
  // Queues `task` behind this model's earlier work; it runs on the pool once `want` is free
  // and receives the access it was granted (the caller of `task` then takes mu() that way).
  // RESOURCE_EXHAUSTED, queuing nothing, when max_queued_per_model requests are waiting on the
  // model or tenant_max_queued on the tenant's models.
  // `self` keeps the entry alive until the task has run. REQUIRES: self.get() == this.
  Status Schedule(const std::shared_ptr<ModelEntry>& self, Want want,
                  std::function<void(Access)> task);
  // Runs `task` at once on the calling thread when Schedule would hand it to the pool right
  // away: nothing is queued, `want` is free and the queue limit is not reached. False, running
  // nothing, otherwise. For requests so small that a thread hand-off costs more than the work.
  bool TryRunInline(const std::shared_ptr<ModelEntry>& self, Want want,
                    const std::function<void(Access)>& task);

  // --- Summary (own mutex; never waits for the model) ---------------------------------------
  // Re-reads the whole summary. REQUIRES: mu() held (shared suffices).
  void Publish();
  // Cheaper update after a forward: its BatchNorm figures and counters. REQUIRES: mu() held.
  void PublishForward(const ForwardRecord& rec);
  void ToWire(v1::Model* out) const;

  // --- Retained forwards (own mutex) -------------------------------------------------------
  // Reserves room for one retained forward (before running it, so a refused forward changes
  // nothing). RESOURCE_EXHAUSTED when max_retained_forwards are held.
  Status ReserveRetained();
  void CancelReservation();
  // Stores a forward under a new id. REQUIRES: a reservation; rec->RetainInput() was called.
  uint64_t CommitRetained(std::unique_ptr<ForwardRecord> rec);
  // The id the next CommitRetained will give (data-parallel jobs key every rank's copy of a
  // retained forward by it: exact while commits are serialised, as the job's command order is).
  uint64_t PeekNextForwardId();
  // The ids of the forwards held now (expired ones dropped first).
  std::vector<uint64_t> RetainedIds();
  // Removes and returns the forward `id`. FAILED_PRECONDITION saying why when there is none:
  // unknown, already released by a Backward, invalidated, or expired.
  Status TakeRetained(uint64_t id, std::unique_ptr<ForwardRecord>* rec);
  // Returns a forward taken by TakeRetained (its Backward failed on a bad argument).
  void PutBackRetained(uint64_t id, std::unique_ptr<ForwardRecord> rec);
  // Records that `id` is gone for `reason` ("released by Backward"), for later messages.
  void NoteReleased(uint64_t id, const std::string& reason);
  // Drops every retained forward, noting `reason`.
  void ReleaseAllRetained(const std::string& reason);
  int retained_count();

  // --- Records for shared forwards (own mutex) ---------------------------------------------
  std::unique_ptr<ForwardRecord> AcquireRecord();
  void ReleaseRecord(std::unique_ptr<ForwardRecord> rec);

 private:
  struct Queued {
    Want want;
    std::function<void(Access)> task;
  };
  struct Retained {
    std::unique_ptr<ForwardRecord> rec;
    std::chrono::steady_clock::time_point expires;
  };
  void DispatchLocked(const std::shared_ptr<ModelEntry>& self);  // REQUIRES: sched_mu_
  // The access `want` gets now. REQUIRES: sched_mu_
  Access AccessFor(Want want) const;
  // Marks a task with `access` running if it may run now (no exclusive task running, and for
  // exclusive access no shared one either); false, changing nothing, otherwise.
  // REQUIRES: sched_mu_
  bool StartLocked(Access access);
  // RESOURCE_EXHAUSTED when the model or its tenant holds as many requests as allowed.
  // REQUIRES: sched_mu_
  Status CheckQueueLimitsLocked() const;
  // Marks a task with `access` finished. REQUIRES: sched_mu_
  void ReleaseLocked(Access access);
  void Done(const std::shared_ptr<ModelEntry>& self, Access access);
  // Done, for a task that ran on the pool: true when the model's next task was handed back to
  // run on the same thread (in *task, with *access).
  bool DoneAndTakeNext(const std::shared_ptr<ModelEntry>& self, Access* access,
                       std::function<void(Access)>* task);
  void ExpireLocked();  // REQUIRES: retained_mu_

  const std::shared_ptr<TenantUsage> tenant_;
  const std::string id_;
  const std::string name_;
  const RegistryLimits limits_;
  ComputePool* const pool_;
  int64_t max_sample_elements_ = 0;
  int64_t forward_cost_per_sample_ = 0;

  std::shared_mutex mu_;
  v1::ModelSpec spec_;              // GUARDED_BY(mu_)
  std::unique_ptr<Model> model_;    // GUARDED_BY(mu_)
  bool deleted_ = false;            // GUARDED_BY(mu_)
  std::unique_ptr<ModelMetrics> metrics_;  // GUARDED_BY(mu_) for destruction

  std::mutex sched_mu_;
  std::deque<Queued> queue_;          // GUARDED_BY(sched_mu_)
  int running_shared_ = 0;            // GUARDED_BY(sched_mu_)
  bool running_exclusive_ = false;    // GUARDED_BY(sched_mu_)
  std::atomic<bool> training_{true};  // mirrors model_->training(), written under mu_

  mutable std::mutex summary_mu_;
  ModelSummary summary_;        // GUARDED_BY(summary_mu_)
  v1::ModelSpec summary_spec_;  // GUARDED_BY(summary_mu_)

  std::mutex retained_mu_;
  std::map<uint64_t, Retained> retained_;  // GUARDED_BY(retained_mu_)
  int reserved_ = 0;                       // GUARDED_BY(retained_mu_)
  uint64_t next_forward_id_ = 1;           // GUARDED_BY(retained_mu_)
  std::map<uint64_t, std::string> released_;  // GUARDED_BY(retained_mu_), bounded

  std::mutex records_mu_;
  std::vector<std::unique_ptr<ForwardRecord>> free_records_;  // GUARDED_BY(records_mu_)
};

class Registry {
 public:
  Registry(const RegistryLimits& limits, Metrics* metrics, ComputePool* pool);

  // Installs the persistence hooks (see server/persistence.h); null: memory only.
  void set_persistence(Persistence* persistence) { persistence_ = persistence; }
  Persistence* persistence() const { return persistence_; }
  const RegistryLimits& limits() const { return limits_; }

  // Validates the name (plain or "TENANT/ID", see server/tenant.h) and the spec, builds the
  // model (in train mode), calls Persistence::OnCreate and makes it visible in the tenant's
  // namespace. INVALID_ARGUMENT (bad name or spec), PERMISSION_DENIED (a non-admin naming
  // another tenant), ALREADY_EXISTS, RESOURCE_EXHAUSTED (server or tenant model limit, tenant
  // parameter quota, parameter or size limits).
  // `prepare`, when given, runs on the built model before anything else sees it (persistence
  // included), e.g. to load a FoldBatchNorm copy's state; its error aborts the create.
  Status Create(const Principal& who, const std::string& requested_name,
                const v1::ModelSpec& spec,
                std::shared_ptr<ModelEntry>* out,
                const std::function<Status(Model&)>& prepare = nullptr);

  // Adds a model rebuilt by the persistence layer at start-up (no OnCreate call, no tenant
  // quota: a restart never loses a model a smaller quota would refuse now).
  Status Restore(const std::string& tenant, const std::string& id, const v1::ModelSpec& spec,
                 std::unique_ptr<Model> model);

  // The model `name` names for `who` (server/tenant.h). NOT_FOUND for an unknown model, and
  // for another tenant's model named by a non-admin.
  Status Find(const Principal& who, const std::string& name,
              std::shared_ptr<ModelEntry>* out) const;

  // Removes a model: Persistence::OnDelete, then out of the map and its metrics gone.
  // REQUIRES: the caller holds entry.mu() exclusively.
  Status Remove(ModelEntry& entry);

  // Every model, sorted by tenant and id.
  std::vector<std::shared_ptr<ModelEntry>> List() const;
  // The models `who` may see: its tenant's, or every model for an admin.
  std::vector<std::shared_ptr<ModelEntry>> List(const Principal& who) const;
  int size() const;

  // The core's limits for building a model.
  Sequential::Limits ModelLimits() const;

 private:
  using Key = std::pair<std::string, std::string>;  // (tenant, id)
  std::shared_ptr<ModelEntry> MakeEntry(std::shared_ptr<TenantUsage> tenant, const std::string& id,
                                        const v1::ModelSpec& spec, std::unique_ptr<Model> model);
  std::string PickId(const std::string& tenant);  // REQUIRES: mu_ held
  // The tenant's usage record, created on first use. REQUIRES: mu_ held exclusively
  std::shared_ptr<TenantUsage> UsageLocked(const std::string& tenant);
  // Gives back what a create reserved (one model, `parameters`). REQUIRES: mu_ held exclusively
  void UnreserveLocked(const Key& key, TenantUsage& usage, int64_t parameters);

  const RegistryLimits limits_;
  Metrics* const metrics_;
  ComputePool* const pool_;
  Persistence* persistence_ = nullptr;

  mutable std::shared_mutex mu_;
  std::map<Key, std::shared_ptr<ModelEntry>> models_;  // GUARDED_BY(mu_)
  std::set<Key> creating_;  // names reserved by creates in progress, GUARDED_BY(mu_)
  std::map<std::string, std::shared_ptr<TenantUsage>> tenants_;  // GUARDED_BY(mu_)
  uint64_t id_state_;               // GUARDED_BY(mu_)
};

}  // namespace normd::server

#endif  // NORMD_SERVER_REGISTRY_H_
