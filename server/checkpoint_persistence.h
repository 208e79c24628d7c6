// CheckpointPersistence: the Persistence hooks (server/persistence.h) implemented with
// checkpoint files in the data directory (server/checkpoint.h).
//
// - Tenants (server/tenant.h): the default tenant's models live in the data directory itself
//   (where every model lived before tenants, so old data directories restore unchanged), tenant
//   T's in <data-dir>/@T/, laid out the same way (server/checkpoint.h). '@' cannot start a
//   model id, so the two never collide.
// - Start-up: every model found in the data directory is rebuilt from its newest usable
//   checkpoint (spec -> config -> Model::Create under the registry's limits, then RestoreInto)
//   and handed to Registry::Restore. A corrupt checkpoint is set aside and the previous one
//   used; a model with none usable is logged and skipped.
// - CreateModel: the first checkpoint is written before the create is acknowledged.
// - Autosave: after `autosave_steps` optimizer steps since the last save, the model is
//   snapshotted under the lock the request already holds (a copy of its state) and a background
//   thread writes the file; a model changed `autosave_interval` ago and not saved since is
//   snapshotted by that thread (it takes the model's lock shared with try_lock, never waiting).
//   Snapshots of one model are written in the order they were taken; a newer one supersedes an
//   older one still waiting.
// - SaveModel: snapshot and durable write in the calling thread.
// - DeleteModel: the files go before the model leaves memory; no later write resurrects them.
// - Shutdown: pending writes finish, then every model changed since its last save is saved.
//
// Thread safety: all hooks may run concurrently for different models, as persistence.h
// requires. Lock order: the entry's mutex, then a model's write mutex, then mu_.
// Lifetime: the registry given to RestoreAll must outlive the background thread, which stops
// in OnShutdown (or the destructor).
#ifndef NORMD_SERVER_CHECKPOINT_PERSISTENCE_H_
#define NORMD_SERVER_CHECKPOINT_PERSISTENCE_H_

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "core/status.h"
#include "server/checkpoint.h"
#include "server/persistence.h"
#include "server/tenant.h"

namespace normd::server {

struct CheckpointPersistenceOptions {
  std::string data_dir = "./normd-data";
  int keep_last = kDefaultKeepCheckpoints;  // checkpoints kept per model, >= 1
  // Save once this many optimizer steps were taken since the last save; 0: no step trigger.
  uint64_t autosave_steps = 0;
  // Save a model whose oldest unsaved change is this old; 0: no time trigger.
  std::chrono::milliseconds autosave_interval{0};
};

class CheckpointPersistence : public Persistence {
 public:
  struct Stats {
    uint64_t saves = 0;        // durable checkpoints written
    uint64_t failures = 0;     // writes that failed (logged; the model stays dirty)
    uint64_t restored = 0;     // models restored at start-up
    uint64_t not_restored = 0; // models found on disk but not restored
  };

  explicit CheckpointPersistence(CheckpointPersistenceOptions options);
  ~CheckpointPersistence() override;
  CheckpointPersistence(const CheckpointPersistence&) = delete;
  CheckpointPersistence& operator=(const CheckpointPersistence&) = delete;

  Status RestoreAll(Registry* registry) override;
  Status OnCreate(ModelEntry& entry) override;
  void OnMutation(ModelEntry& entry, Mutation what) override;
  Status Save(ModelEntry& entry, uint64_t* step) override;
  Status OnDelete(ModelEntry& entry) override;
  void OnShutdown(Registry* registry) override;

  Stats stats() const;

 private:
  // What this object knows of one model.
  struct Tracked {
    std::string dir;              // the tenant's directory; immutable
    std::mutex write_mu;          // serialises writes to the model's directory
    uint64_t written_gen = 0;     // newest snapshot written; GUARDED_BY(write_mu)
    // GUARDED_BY(mu_):
    uint64_t changes = 0;         // OnMutation calls
    uint64_t saved_changes = 0;   // changes covered by the newest durable checkpoint
    uint64_t saved_step = 0;      // optimizer step of the newest durable checkpoint
    uint64_t next_gen = 1;        // generation of the next snapshot
    uint64_t snap_step = 0;       // optimizer step of the newest snapshot taken
    std::chrono::steady_clock::time_point dirty_since;
    bool deleted = false;
    std::unique_ptr<CheckpointSnapshot> pending;  // waiting for the writer thread
    uint64_t pending_gen = 0;
    uint64_t pending_changes = 0;
  };

  // Models are tracked by their display name (server/tenant.h), unique across tenants.
  std::shared_ptr<Tracked> Track(const ModelEntry& entry);  // REQUIRES: mu_ held
  std::shared_ptr<Tracked> Find(const std::string& name);
  // The directory of a tenant's models.
  std::string TenantDir(const std::string& tenant) const;
  Status RestoreTenant(Registry* registry, const std::string& tenant);
  // Snapshots the model (REQUIRES: its lock held) and returns the generation and change count
  // the snapshot covers.
  Status Snapshot(ModelEntry& entry, Tracked* t, CheckpointSnapshot* snap, uint64_t* gen,
                  uint64_t* changes);
  // Writes a snapshot unless a newer one of the model was written already or it was deleted.
  Status Write(Tracked* t, const CheckpointSnapshot& snap, uint64_t gen, uint64_t changes);
  void WriterLoop();
  void SnapshotStaleModels();  // the time trigger, from the writer thread
  void StopWriter();

  const CheckpointPersistenceOptions options_;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::map<std::string, std::shared_ptr<Tracked>> models_;  // GUARDED_BY(mu_)
  bool work_ = false;     // a pending snapshot waits; GUARDED_BY(mu_)
  bool stop_ = false;     // GUARDED_BY(mu_)
  Registry* registry_ = nullptr;  // GUARDED_BY(mu_); set by RestoreAll
  Stats stats_;           // GUARDED_BY(mu_)
  std::thread writer_;
};

}  // namespace normd::server

#endif  // NORMD_SERVER_CHECKPOINT_PERSISTENCE_H_
