// Registry: the models a server holds, by id, and ModelEntry: one model with everything the
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
};

// INVALID_ARGUMENT unless `id` is a valid model id (see above). `field` names it in messages.
Status ValidateModelId(const std::string& id, const std::string& field);

class ModelEntry {
 public:
  enum class Access { kShared, kExclusive };
  // A forward's access depends on the model's mode when it reaches the front of the queue.
  enum class Want { kShared, kExclusive, kByMode };

  ModelEntry(std::string id, v1::ModelSpec spec, std::unique_ptr<Model> model,
             std::unique_ptr<ModelMetrics> metrics, const RegistryLimits& limits,
             ComputePool* pool);
  // Frees the model and hands the freed heap back to the OS (malloc_trim): a deleted model's
  // parameters and batch buffers are megabytes that glibc would otherwise keep.
  ~ModelEntry();
  ModelEntry(const ModelEntry&) = delete;
  ModelEntry& operator=(const ModelEntry&) = delete;

  const std::string& id() const { return id_; }

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
  // RESOURCE_EXHAUSTED, queuing nothing, when max_queued_per_model requests are waiting.
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
  // Marks a task with `access` finished. REQUIRES: sched_mu_
  void ReleaseLocked(Access access);
  void Done(const std::shared_ptr<ModelEntry>& self, Access access);
  // Done, for a task that ran on the pool: true when the model's next task was handed back to
  // run on the same thread (in *task, with *access).
  bool DoneAndTakeNext(const std::shared_ptr<ModelEntry>& self, Access* access,
                       std::function<void(Access)>* task);
  void ExpireLocked();  // REQUIRES: retained_mu_

  const std::string id_;
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

  // Validates the id and the spec, builds the model (in train mode), calls
  // Persistence::OnCreate and makes it visible. INVALID_ARGUMENT (bad id or spec),
  // ALREADY_EXISTS, RESOURCE_EXHAUSTED (model limit, parameter or size limits).
  // `prepare`, when given, runs on the built model before anything else sees it (persistence
  // included), e.g. to load a FoldBatchNorm copy's state; its error aborts the create.
  Status Create(const std::string& requested_id, const v1::ModelSpec& spec,
                std::shared_ptr<ModelEntry>* out,
                const std::function<Status(Model&)>& prepare = nullptr);

  // Adds a model rebuilt by the persistence layer at start-up (no OnCreate call).
  Status Restore(const std::string& id, const v1::ModelSpec& spec, std::unique_ptr<Model> model);

  // NOT_FOUND for an unknown id.
  Status Find(const std::string& id, std::shared_ptr<ModelEntry>* out) const;

  // Removes a model: Persistence::OnDelete, then out of the map and its metrics gone.
  // REQUIRES: the caller holds entry.mu() exclusively.
  Status Remove(ModelEntry& entry);

  // Every model, sorted by id.
  std::vector<std::shared_ptr<ModelEntry>> List() const;
  int size() const;

  // The core's limits for building a model.
  Sequential::Limits ModelLimits() const;

 private:
  std::shared_ptr<ModelEntry> MakeEntry(const std::string& id, const v1::ModelSpec& spec,
                                        std::unique_ptr<Model> model);
  std::string PickId();  // REQUIRES: mu_ held

  const RegistryLimits limits_;
  Metrics* const metrics_;
  ComputePool* const pool_;
  Persistence* persistence_ = nullptr;

  mutable std::shared_mutex mu_;
  std::map<std::string, std::shared_ptr<ModelEntry>> models_;  // GUARDED_BY(mu_)
  std::set<std::string> creating_;  // ids reserved by creates in progress, GUARDED_BY(mu_)
  uint64_t id_state_;               // GUARDED_BY(mu_)
};

}  // namespace normd::server

#endif  // NORMD_SERVER_REGISTRY_H_
