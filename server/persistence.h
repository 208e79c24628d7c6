// Persistence: the seam between the model registry and durable storage.
//
// The registry and the service call these hooks at each point of a model's life; an
// implementation (checkpoints in --data-dir) decides what to write and when. Without one
// (Registry::set_persistence not called) models live in memory only and SaveModel answers
// FAILED_PRECONDITION "persistence not configured".
//
// Locking contract. Every hook that receives a ModelEntry says which of the entry's locks the
// caller holds. A hook may snapshot the model under the lock it is given (a shared lock is
// enough to read the whole state: nothing mutates a model without the exclusive lock) but must
// not take the entry's mutex itself when the caller already holds it.
//
// Thread safety: implementations must be thread-safe; hooks for different models run
// concurrently.
#ifndef NORMD_SERVER_PERSISTENCE_H_
#define NORMD_SERVER_PERSISTENCE_H_

#include <cstdint>
#include <string>

#include "core/status.h"

namespace normd::server {

class ModelEntry;
class Registry;

// What kind of change a mutation made, so an implementation can apply its autosave policy
// (every N steps, every T seconds) without inspecting the model.
enum class Mutation {
  kStep,         // TrainStep or ApplyGradients: parameters and optimizer state moved
  kForward,      // a train-mode forward updated BatchNorm buffers (or dropout's generator)
  kMode,         // SetMode
  kState,        // SetState
  kReset,        // ResetRunningStats
  kOptimizer,    // UpdateOptimizer
  kLayerOptions, // SetLayerOptions
  kAdapt,        // AdaptStatistics replaced BatchNorm buffers
};

class Persistence {
 public:
  virtual ~Persistence() = default;

  // At start-up, before the server accepts requests: adds every stored model to `registry`
  // (Registry::Restore). A model that cannot be restored is logged and skipped; a non-OK
  // result stops the server from starting (e.g. an unreadable data directory).
  virtual Status RestoreAll(Registry* registry) = 0;

  // A model was created and is about to become visible. The caller holds the entry exclusively
  // and nobody else can reach it yet. A non-OK result fails CreateModel with that status and the
  // model is discarded, so an acknowledged create is durable when this returns OK.
  virtual Status OnCreate(ModelEntry& entry) = 0;

  // A request changed the model. The caller holds the entry's exclusive lock; keep this cheap
  // (mark dirty, maybe snapshot and hand the write to a background thread).
  virtual void OnMutation(ModelEntry& entry, Mutation what) = 0;

  // SaveModel: returns once a checkpoint holding the model's current state is durable, with
  // the step it holds. The caller holds the entry's shared lock.
  virtual Status Save(ModelEntry& entry, uint64_t* step) = 0;

  // DeleteModel: removes the model's files. The caller holds the entry's exclusive lock; the
  // model is removed from memory only when this returns OK.
  virtual Status OnDelete(ModelEntry& entry) = 0;

  // After the server drained its requests at shutdown: save every model changed since its last
  // save. No request runs any more; the hook may lock entries as it likes.
  virtual void OnShutdown(Registry* registry) = 0;
};

}  // namespace normd::server

#endif  // NORMD_SERVER_PERSISTENCE_H_
