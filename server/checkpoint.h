// Checkpoints: a model's spec, state and counters on disk, written crash-safely and read back
// bit-exactly, or rejected with a precise error.
//
// Layout of the data directory:
//   <data-dir>/<model-id>/ckpt-<step, 20 digits>-<seq, 20 digits>.nckpt   the checkpoints
//   <data-dir>/<model-id>/.tmp-*            a save in progress (or cut short by a crash)
//   <data-dir>/<model-id>/corrupt/          checkpoints the loader rejected, set aside
//   <data-dir>/.deleted-<model-id>-*        a model being removed
// (for the default tenant; another tenant's models are laid out the same way in
// <data-dir>/@<tenant>/, see server/checkpoint_persistence.h).
// `seq` grows by one with every save of a model, so the newest checkpoint is the one with the
// largest seq (several saves may hold the same step, e.g. after SetMode).
//
// File format, version 1. Integers are little-endian.
//   magic   "NORMDCK1"                      8 bytes
//   version u32 = 1
//   sections, in this order, each framed as
//     type u32 | length u64 | crc u32 | payload (length bytes)
//   where crc is the CRC-32C of the type, length and payload bytes:
//     1 header   checkpoint.CheckpointHeader (id, step, mode, frozen, rng, time)
//     2 spec     normd.v1.ModelSpec as the model was created, with later optimizer updates
//     3 state    normd.v1.ModelState: every state_dict entry and optimizer slot, each tensor
//                in the raw (little-endian float32) encoding, so values round-trip bit-exactly
//     4 end      checkpoint.CheckpointTrailer: section count, byte count and CRC-32C of all
//                bytes before it
//   and nothing after the end section.
// A reader rejects a file on any mismatch: magic, version, a section's type, order, length or
// CRC, a payload that does not parse or does not validate, a missing or misplaced end section,
// trailing bytes. A corrupt or truncated file is never loaded as a model.
//
// Writing: the bytes go to a .tmp- file, which is fsync'ed, renamed to its final name, and the
// directory is fsync'ed. Only then are checkpoints beyond the newest K deleted, so a crash at any
// moment leaves the previous checkpoint (and the new one, once renamed) intact.
//
// Thread safety: the functions keep no state. Calls for different model ids may run
// concurrently; calls touching the same model id's directory (save, load, remove) must be
// serialised by the caller.
#ifndef NORMD_SERVER_CHECKPOINT_H_
#define NORMD_SERVER_CHECKPOINT_H_

#include <array>
#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "core/model.h"
#include "core/status.h"
#include "normd/v1/normd.pb.h"

namespace normd::server {

constexpr uint32_t kCheckpointFormatVersion = 1;
constexpr int kDefaultKeepCheckpoints = 3;

// Model ids become directory names: 1 to 128 characters from [A-Za-z0-9._-], not starting
// with '.' (the registry's rule, with room to spare). INVALID_ARGUMENT otherwise.
Status ValidateModelIdForDisk(const std::string& model_id);

// A model's checkpoint content, encoded in memory.
struct CheckpointSnapshot {
  std::string model_id;
  uint64_t step = 0;
  std::string bytes;  // the whole file
};

// Everything a checkpoint holds, decoded and validated.
struct LoadedCheckpoint {
  std::string path;  // the file it came from (empty when decoded from memory)
  std::string model_id;
  uint64_t step = 0;
  uint64_t seq = 0;  // from the file name (0 when decoded from memory)
  bool training = true;
  bool running_stats_frozen = false;
  std::array<uint64_t, 4> rng_state{};
  int64_t created_unix_micros = 0;
  v1::ModelSpec spec;
  std::vector<NamedTensor> state;  // model entries and "optimizer.*" entries
  std::vector<LayerOptionsChange> layer_options;  // empty in checkpoints before they existed
  bool inference_only = false;
};

struct SaveInfo {
  std::string path;
  uint64_t step = 0;
  uint64_t seq = 0;
  uint64_t bytes = 0;
  std::vector<std::string> removed;  // older checkpoints deleted by the rotation
};

struct LoadReport {
  std::vector<std::string> rejected;     // "<file>: <reason>", newest first
  std::vector<std::string> moved_aside;  // where rejected files went
  std::vector<std::string> skipped;      // intact files the `accept` callback refused
  int temp_files_removed = 0;
};

// Encodes the model's current spec, state (optimizer included), step, mode, frozen flag and
// dropout generator. Fast (a copy of the state); this is the part that needs the model held
// still. REQUIRES: nothing mutates `model` during the call (the caller holds its lock).
Status SnapshotCheckpoint(const std::string& model_id, const v1::ModelSpec& spec, Model& model,
                          CheckpointSnapshot* out);

// Writes `snapshot` durably as the model's newest checkpoint and then deletes all but the
// newest `keep_last` (>= 1). Returns only once the file and its directory entry are on stable
// storage. Leaves no temp file behind on failure. Creates the directories as needed.
Status WriteCheckpoint(const std::string& data_dir, const CheckpointSnapshot& snapshot,
                       int keep_last, SaveInfo* info);

// SnapshotCheckpoint then WriteCheckpoint.
Status SaveCheckpoint(const std::string& data_dir, const std::string& model_id,
                      const v1::ModelSpec& spec, Model& model, int keep_last, SaveInfo* info);

// Decodes and validates a whole checkpoint file held in memory (see the format above). On
// error `out` is unspecified. Safe on arbitrary bytes (the fuzz target).
Status DecodeCheckpoint(std::string_view bytes, LoadedCheckpoint* out);

// Reads and decodes one file; also checks that its name and header agree (step).
Status ReadCheckpointFile(const std::string& path, LoadedCheckpoint* out);

// Called on each intact candidate, newest first; a non-OK result skips the candidate without
// setting it aside (the file is sound but unusable here, e.g. its spec exceeds this server's
// limits, and a later server may still want it).
using CheckpointAcceptFn = std::function<Status(const LoadedCheckpoint&)>;

// Loads the model's newest usable checkpoint. Removes leftover temp files first. A file that
// fails to read or decode, or whose header names another model, is logged, moved to
// corrupt/, and the next older one is tried. NOT_FOUND when the model has no checkpoint
// files; FAILED_PRECONDITION naming each rejection when none is usable.
Status LoadLatestCheckpoint(const std::string& data_dir, const std::string& model_id,
                            LoadedCheckpoint* out, const CheckpointAcceptFn& accept = nullptr,
                            LoadReport* report = nullptr);

// Prefix of a tenant's directory inside the data directory ("@team-a"), see
// server/checkpoint_persistence.h. Model ids never start with it.
constexpr char kTenantDirPrefix[] = "@";

// The tenants with a directory (kTenantDirPrefix + a name) in `data_dir`, sorted. The names are
// not validated here (Registry::Restore refuses an invalid one).
// A missing data directory holds none.
Status ScanTenantDirs(const std::string& data_dir, std::vector<std::string>* tenants);

// The ids of models with at least one checkpoint file, sorted. Finishes interrupted removals
// (deletes .deleted-* directories). A missing data directory holds no models.
Status ScanDataDir(const std::string& data_dir, std::vector<std::string>* model_ids);

// Deletes all of a model's files. Crash-safe: the directory is first renamed out of the
// namespace in one step, so a crash part-way never leaves a model that would be restored.
// OK when the model has no files.
Status RemoveModelFiles(const std::string& data_dir, const std::string& model_id);

// Applies a loaded checkpoint to a model freshly built from `ckpt.spec`: the whole state
// (strict, optimizer entries included: every entry the model has must be present), mode and
// frozen flag, per-layer options, inference-only flag, step and the dropout generator.
// Validates before writing: on error the model is unchanged.
Status RestoreInto(const LoadedCheckpoint& ckpt, Model* model);

}  // namespace normd::server

#endif  // NORMD_SERVER_CHECKPOINT_H_
