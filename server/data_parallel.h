// DataParallelJob: normd as a data-parallel job of N ranks (`mpirun -np N normd ...`, issue 12).
//
// Rank 0 runs the whole server (gRPC, health, reflection, /metrics, persistence); the other
// ranks ("workers") open no port and run RunWorker. Every rank holds a replica of every model.
// Rank 0 drives the workers with one ordered stream of commands over a JobChannel (MPI outside
// this file, server/mpi_job.h): each command is an op code, the model's key, a number and
// a payload, usually the request's own serialized proto, so a worker decodes it exactly as rank
// 0 did.
//
// What travels:
//  - CreateModel (and FoldBatchNorm's copy), and every model at start-up after rank 0 restored
//    the data directory: kInstall with the model's checkpoint bytes (server/checkpoint.h); the
//    worker builds the model from them (RestoreInto), so workers need no volume.
//  - DeleteModel: kDelete. SetMode, SetState, ResetRunningStats, UpdateOptimizer,
//    SetLayerOptions: the request, applied by the same core call after rank 0's succeeded (a
//    call that succeeded on rank 0 succeeds on an identical replica). AdaptStatistics: the
//    model's new state, set in place (kSync).
//  - TrainStep (and each TrainStream message), Forward in train mode or with
//    retain_for_backward, Backward, ApplyGradients: the request without its tensors' values,
//    then each rank's shard of the rows (ShardRows: contiguous, sizes within one, possibly
//    empty) of the input, labels or target and output gradient (Scatter, MPI_Scatterv); each
//    rank calls the core with its DataParallelShard, whose collective (JobChannel::collective)
//    combines BatchNorm's statistics, the loss and the gradients (SyncBatchNorm,
//    core/collective.h). Forward's output and Backward's input gradient come back to rank 0
//    row shard by row shard (Gather).
//    The whole batch is checked on rank 0 before anything is sent (the core's REQUIRES: a check
//    that failed on one shard only would leave the ranks apart mid-step).
//    What rank 0 reports describes the whole batch: the drift figures in its record (the
//    drift histograms, the published BatchNorm summary) because the core combines BatchNorm's
//    statistics across ranks in every sharded forward, eval-mode and frozen layers' included;
//    Forward's layer_stats because every rank's per-node moments are gathered and combined
//    (Forward below); the running statistics are the whole batch's on every rank.
//  - Evaluate and eval-mode Forward: split like TrainStep (the core sums Evaluate's loss and
//    correct predictions). Rank 0 alone would leave the other ranks' cores idle: on a 2-rank
//    job (1 core per rank), a Conv-BN CNN's split Evaluate at batch 64 and 256 ran 1.7-1.9x
//    as many samples/s as its eval Forward on rank 0 alone (measured before the switch).
//  - GetState, SaveModel, FoldBatchNorm's read: rank 0 alone (they change nothing, and rank 0's
//    replica is every rank's).
//
// Order. A command and the collectives it starts must not interleave with another command's:
// rank 0 holds one job-wide mutex from sending a command to the end of its collectives
// (Lock), so the job executes one model operation at a time, in the order rank 0 took the
// mutex; requests to different models, which run in parallel in a single process, are
// serialised in a job (a first version: per-model streams would need a communicator per model).
// The caller keeps holding the model's entry lock as the service does, so each model's commands
// reach the workers in its own order.
//
// Retained forwards: a worker keeps its shard's record of a retained Forward under the id rank
// 0 gives it (ModelEntry::PeekNextForwardId under the job mutex), and drops the ones rank 0 no
// longer holds (each retained Forward and Backward carries rank 0's list).
//
// Persistence: the job is also the Persistence the registry calls (a decorator around the
// checkpoint persistence, or none with --in-memory): rank 0 alone writes checkpoints; the
// hooks additionally replicate creates and deletes, and restore sends every model to the
// workers.
//
// Failure: a worker that executes differently from rank 0 (which an identical replica cannot)
// or cannot find a model rank 0 named stops its process (exit 3): the launcher then ends the
// job, rather than let collectives wait forever. A rank that dies ends the job through the
// launcher too; one that stops or hangs without dying is caught by rank 0's watchdog
// (StartWatchdog, --job-stall-timeout: exit 4).
#ifndef NORMD_SERVER_DATA_PARALLEL_H_
#define NORMD_SERVER_DATA_PARALLEL_H_

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <thread>
#include <vector>

#include "core/collective.h"
#include "core/model.h"
#include "core/sequential.h"
#include "core/status.h"
#include "normd/v1/normd.pb.h"
#include "server/convert.h"
#include "server/metrics.h"
#include "server/persistence.h"
#include "server/registry.h"

namespace normd::server {

// The job's messages between rank 0 and the workers, apart from the models' collectives.
// Every rank calls the same operations in the same order (collective semantics).
class JobChannel {
 public:
  virtual ~JobChannel() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  // Rank 0's *bytes reach every rank (the others' *bytes are replaced).
  virtual void Broadcast(std::string* bytes) = 0;
  // Rank 0 receives every rank's `mine`, in rank order, in *all; other ranks only send.
  virtual void Gather(const std::string& mine, std::vector<std::string>* all) = 0;
  // Rank 0 sends rank r the bytes [offsets[r], offsets[r] + counts[r]) of `data` and keeps its
  // own in place; rank r (> 0) receives its `bytes` into `out` (data, counts, offsets unused).
  virtual void Scatter(const void* data, const std::vector<int64_t>& counts,
                       const std::vector<int64_t>& offsets, void* out, int64_t bytes) = 0;
  // The collective of the models' data-parallel operations (core/collective.h).
  virtual Collective* collective() = 0;
};

// What a build and its model-affecting flags are, for the start-up check: ranks whose
// descriptions differ must not form a job. One "name=value" line each.
struct JobIdentity {
  std::vector<std::pair<std::string, std::string>> items;
  std::string Encode() const;
};
// Every rank sends its identity to rank 0, which compares each with its own; the verdict
// (empty: all agree; otherwise the first difference, naming the rank, the item and both
// values) is broadcast, so every rank returns the same string.
std::string CheckJobIdentity(JobChannel* channel, const JobIdentity& mine);

// Digests every model of `registry` (sorted by tenant and id: parameters, buffers, optimizer
// state, step, mode) as "<models>:<hex>", holding each entry's lock shared, the locks left in
// *locks for the caller to release. A single process's CheckReplicas.
std::string DigestRegistry(Registry* registry, int* models,
                           std::vector<std::shared_lock<std::shared_mutex>>* locks);

class DataParallelJob final : public Persistence {
 public:
  // `limits`: the limits models are built with (Registry::ModelLimits on rank 0).
  DataParallelJob(JobChannel* channel, const Sequential::Limits& limits);
  ~DataParallelJob() override;

  int world_size() const { return channel_->size(); }
  // Rank 0: the checkpoint persistence the hooks below forward to (null: in memory). Set
  // before the server starts.
  void set_inner(Persistence* inner) { inner_ = inner; }
  // Rank 0: where each distributed operation's compute and collective time go (null: nowhere).
  // Set before the first request.
  void set_metrics(Metrics* metrics) { metrics_ = metrics; }
  int rank() const { return channel_->rank(); }

  // ---- Rank 0: compute. REQUIRES: the entry's lock held as the service holds it. ----------
  Status TrainStep(ModelEntry& e, const v1::TrainStepRequest& req, const DecodedTensor& input,
                   const DecodedTargets& targets, TrainResult* result);
  // A Forward in either mode; with retain_for_backward, REQUIRES a reservation, and the caller
  // commits rec with ModelEntry::CommitRetained before releasing the entry's lock.
  // rec receives rank 0's shard; *output the whole batch's output. With req.layer_stats(),
  // *layer_stats receives the whole batch's per-node statistics: every rank's
  // ActivationMoments, gathered to rank 0 and combined in rank order (CombineMoments).
  Status Forward(ModelEntry& e, const v1::ForwardRequest& req, const DecodedTensor& input,
                 ForwardRecord* rec, Tensor* output,
                 std::vector<LayerActivationStats>* layer_stats);
  // The Backward of retained forward req.forward_id() (taken out into rec): grad_output is the
  // whole batch's; *grad_input (may be null) receives the whole batch's input gradient.
  Status Backward(ModelEntry& e, const v1::BackwardRequest& req, ForwardRecord* rec,
                  const ConstTensorView& grad_output, Tensor* grad_input);
  Status ApplyGradients(ModelEntry& e, StepResult* result);
  // Evaluate split over the ranks (the whole batch's loss and accuracy; BatchNorm layers that
  // normalise with batch statistics in eval mode, track_running_stats=false, use the whole
  // batch's). rec receives rank 0's shard. REQUIRES: the entry's lock held, shared suffices.
  Status Evaluate(ModelEntry& e, const v1::EvaluateRequest& req, const DecodedTensor& input,
                  const DecodedTargets& targets, ForwardRecord* rec, EvalResult* result);

  // ---- Rank 0: control operations, after rank 0's own call succeeded. ---------------------
  enum class Control { kSetMode, kSetState, kResetRunningStats, kUpdateOptimizer,
                       kSetLayerOptions };
  void Replicate(ModelEntry& e, Control op, const google::protobuf::Message& req);
  // AdaptStatistics' commit: the workers take the model's state as rank 0 has it now.
  void SyncState(ModelEntry& e);

  // Every rank's digest of its replicas, rank 0's first, and whether all are equal.
  // Locks every entry of `registry` shared (no entry lock may be held by the caller).
  Status CheckReplicas(Registry* registry, v1::CheckReplicasResponse* out);

  // Rank 0, at the end: the workers leave RunWorker.
  void StopWorkers();

  // Rank 0: a thread that ends the process with kExitStalled, after logging why, once one
  // operation has held the job (its command, scatter, collectives, gathers) for longer than
  // `timeout`: a worker that is stopped, hung or unreachable would otherwise hold rank 0 in
  // MPI forever (a dead one ends the job through its launcher). Nothing with 0, or alone.
  static constexpr int kExitStalled = 4;
  void StartWatchdog(std::chrono::milliseconds timeout);

  // ---- Workers ----------------------------------------------------------------------------
  // Executes rank 0's commands until kStop; returns the process's exit code.
  int RunWorker();

  // ---- Persistence (rank 0) ---------------------------------------------------------------
  Status RestoreAll(Registry* registry) override;
  Status OnCreate(ModelEntry& entry) override;
  void OnMutation(ModelEntry& entry, Mutation what) override;
  Status Save(ModelEntry& entry, uint64_t* step) override;
  Status OnDelete(ModelEntry& entry) override;
  void OnShutdown(Registry* registry) override;

 private:
  struct Replica;
  struct Command;
  struct ShardBatch;
  // The channel's collective, timing each call and counting its bytes (for the metrics). The
  // shards handed to the core point to it, so retained forwards keep a valid collective.
  class TimedCollective : public Collective {
   public:
    explicit TimedCollective(Collective* inner) : inner_(inner) {}
    int rank() const override { return inner_->rank(); }
    int size() const override { return inner_->size(); }
    void AllReduceSum(double* data, int64_t n) override;
    void AllReduceSum(float* data, int64_t n) override;
    void AllGather(const double* in, int64_t n, double* out) override;
    void StartAllReduceSum(float* data, int64_t n) override;
    void Progress() override;
    void WaitAll() override;
    void Reset() { seconds_ = 0, bytes_ = 0; }
    double seconds() const { return seconds_; }
    double bytes() const { return bytes_; }

   private:
    Collective* const inner_;
    double seconds_ = 0;
    double bytes_ = 0;
  };
  // Times one distributed operation on rank 0 and records it when it goes out of scope.
  class OpTimer;
  // Holds job_mu_ and marks the job busy for the watchdog.
  class JobLock;

  // Rank 0: sends a command. REQUIRES: job_mu_ held.
  void Send(const Command& c);
  // The shard of this rank over `rows`; *n its row count.
  DataParallelShard ShardOf(int64_t rows, int64_t* n);
  // Every rank's rows of a batch of `rows` rows of `row_bytes` bytes each: rank 0 sends them from
  // `data` (and keeps its own in place), the others receive theirs into *out.
  void ScatterRows(const void* data, int64_t rows, int64_t row_bytes, std::vector<char>* out);
  // Rank 0: sends command c (op and key set; its payload becomes the batch's shapes) and
  // scatters the batch's rows and targets. REQUIRES: job_mu_ held.
  void SendBatch(Command* c, const v1::Tensor& input_wire, const v1::Tensor* target_wire,
                 const ConstTensorView& x, const Targets& t);
  // Workers: receives the shard of the batch SendBatch sent with c.
  void ReceiveBatch(const Command& c, const char* op, ShardBatch* b);
  // Rank 0's model as checkpoint bytes (for kInstall / kSync).
  Status Snapshot(ModelEntry& e, std::string* bytes);

  // Workers.
  void Execute(const Command& c);
  Replica* Find(const std::string& key, const char* op);
  std::string DigestAll();

  JobChannel* const channel_;
  Persistence* inner_ = nullptr;
  const Sequential::Limits limits_;
  Metrics* metrics_ = nullptr;
  TimedCollective timed_;  // used under job_mu_ on rank 0
  std::mutex job_mu_;  // rank 0: one command (and its collectives) at a time
  std::map<std::string, std::unique_ptr<Replica>> replicas_;  // workers only
  std::unique_ptr<ShardBatch> shard_batch_;  // workers: the batch buffers, reused
  bool stopped_ = false;  // GUARDED_BY(job_mu_)
  // Rank 0: when job_mu_ was taken (steady clock, ns), 0 while it is free.
  std::atomic<int64_t> busy_since_ns_{0};
  std::thread watchdog_;
  std::mutex watchdog_mu_;
  std::condition_variable watchdog_cv_;
  bool watchdog_stop_ = false;  // GUARDED_BY(watchdog_mu_)
};

}  // namespace normd::server

#endif  // NORMD_SERVER_DATA_PARALLEL_H_
