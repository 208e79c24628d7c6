// TrainerService: the normd.v1.Trainer gRPC service on the callback API.
//
// gRPC's threads only parse, validate and queue: every request that touches a model runs on the
// ComputePool through the model's queue (server/registry.h), and the reactor is finished from
// there. GetModel and ListModels answer inline from the published summaries.
//
// Semantics (issue 3): new models start in train mode; a train-mode Forward updates the
// BatchNorm running statistics exactly as module(x) in PyTorch; eval-mode Forwards of a model run
// concurrently; Forward with retain_for_backward keeps the forward for one Backward, which
// accumulates parameter gradients until ApplyGradients; TrainStep does zero-grad, forward, loss,
// backward and step atomically; TrainStream answers each message in order and ends the stream
// with the first error; Evaluate changes nothing. A failed request leaves the model as it was.
//
// Thread safety: all methods are called by gRPC from any thread.
#ifndef NORMD_SERVER_SERVICE_H_
#define NORMD_SERVER_SERVICE_H_

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <set>
#include <utility>

#include "normd/v1/normd.grpc.pb.h"
#include "server/compute_pool.h"
#include "server/metrics.h"
#include "server/persistence.h"
#include "server/registry.h"
#include "server/tenant.h"

namespace normd::server {

class DataParallelJob;

class AdaptStatisticsReactor;
class Authenticator;
class TrainStreamReactor;

// The generated v1::Trainer::CallbackService, except that TrainStream takes raw bytes: the typed
// stream reader reports a message that does not parse exactly like the client's half-close, so
// the stream would end OK with the rest of its messages silently dropped. Parsing them here lets
// such a message end the stream with INVALID_ARGUMENT. A method added to the contract must be
// added to this list too (a method missing from it answers UNIMPLEMENTED).
using TrainerServiceBase = v1::Trainer::WithCallbackMethod_CreateModel<
    v1::Trainer::WithCallbackMethod_GetModel<v1::Trainer::WithCallbackMethod_ListModels<
    v1::Trainer::WithCallbackMethod_DeleteModel<v1::Trainer::WithCallbackMethod_SetMode<
    v1::Trainer::WithCallbackMethod_Forward<v1::Trainer::WithCallbackMethod_Backward<
    v1::Trainer::WithCallbackMethod_ApplyGradients<v1::Trainer::WithCallbackMethod_TrainStep<
    v1::Trainer::WithRawCallbackMethod_TrainStream<v1::Trainer::WithCallbackMethod_Evaluate<
    v1::Trainer::WithCallbackMethod_GetState<v1::Trainer::WithCallbackMethod_SetState<
    v1::Trainer::WithCallbackMethod_ResetRunningStats<
    v1::Trainer::WithCallbackMethod_UpdateOptimizer<
    v1::Trainer::WithCallbackMethod_SaveModel<
    v1::Trainer::WithCallbackMethod_SetLayerOptions<
    v1::Trainer::WithCallbackMethod_FoldBatchNorm<
    v1::Trainer::WithCallbackMethod_AdaptStatistics<
    v1::Trainer::WithCallbackMethod_CheckReplicas<v1::Trainer::Service>>>>>>>>>>>>>>>>>>>>;

class TrainerService final : public TrainerServiceBase {
 public:
  // The pointers must outlive the service. `auth` null: every call is tenant "default", admin;
  // otherwise every Trainer call it does not identify ends with its refusal (UNAUTHENTICATED,
  // PERMISSION_DENIED) before anything runs, and every other call acts for the principal it
  // names: models are found, listed and created in that tenant's namespace (server/tenant.h).
  // `data_parallel` (rank 0 of an MPI job, server/data_parallel.h; null otherwise): the
  // compute that mixes a batch's samples and every change of a model also runs on the workers.
  TrainerService(Registry* registry, Metrics* metrics, ComputePool* pool,
                 const Authenticator* auth = nullptr, DataParallelJob* data_parallel = nullptr);

  // From now on new RPCs answer UNAVAILABLE and idle TrainStreams are finished (UNAVAILABLE);
  // requests already accepted run to completion.
  void BeginShutdown();
  // Blocks until no Trainer call is in flight, or until `deadline`. True when idle.
  bool WaitIdle(std::chrono::steady_clock::time_point deadline);

  grpc::ServerUnaryReactor* CreateModel(grpc::CallbackServerContext* ctx,
                                        const v1::CreateModelRequest* req,
                                        v1::Model* resp) override;
  grpc::ServerUnaryReactor* GetModel(grpc::CallbackServerContext* ctx,
                                     const v1::GetModelRequest* req, v1::Model* resp) override;
  grpc::ServerUnaryReactor* ListModels(grpc::CallbackServerContext* ctx,
                                       const v1::ListModelsRequest* req,
                                       v1::ListModelsResponse* resp) override;
  grpc::ServerUnaryReactor* DeleteModel(grpc::CallbackServerContext* ctx,
                                        const v1::DeleteModelRequest* req,
                                        v1::DeleteModelResponse* resp) override;
  grpc::ServerUnaryReactor* SetMode(grpc::CallbackServerContext* ctx,
                                    const v1::SetModeRequest* req, v1::Model* resp) override;
  grpc::ServerUnaryReactor* Forward(grpc::CallbackServerContext* ctx,
                                    const v1::ForwardRequest* req,
                                    v1::ForwardResponse* resp) override;
  grpc::ServerUnaryReactor* Backward(grpc::CallbackServerContext* ctx,
                                     const v1::BackwardRequest* req,
                                     v1::BackwardResponse* resp) override;
  grpc::ServerUnaryReactor* ApplyGradients(grpc::CallbackServerContext* ctx,
                                           const v1::ApplyGradientsRequest* req,
                                           v1::ApplyGradientsResponse* resp) override;
  grpc::ServerUnaryReactor* TrainStep(grpc::CallbackServerContext* ctx,
                                      const v1::TrainStepRequest* req,
                                      v1::TrainStepResponse* resp) override;
  // Messages are TrainStepRequest and TrainStepResponse, parsed and serialized by the reactor.
  grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* TrainStream(
      grpc::CallbackServerContext* ctx) override;
  grpc::ServerUnaryReactor* Evaluate(grpc::CallbackServerContext* ctx,
                                     const v1::EvaluateRequest* req,
                                     v1::EvaluateResponse* resp) override;
  grpc::ServerUnaryReactor* GetState(grpc::CallbackServerContext* ctx,
                                     const v1::GetStateRequest* req,
                                     v1::ModelState* resp) override;
  grpc::ServerUnaryReactor* SetState(grpc::CallbackServerContext* ctx,
                                     const v1::SetStateRequest* req, v1::Model* resp) override;
  grpc::ServerUnaryReactor* ResetRunningStats(grpc::CallbackServerContext* ctx,
                                              const v1::ResetRunningStatsRequest* req,
                                              v1::Model* resp) override;
  grpc::ServerUnaryReactor* UpdateOptimizer(grpc::CallbackServerContext* ctx,
                                            const v1::UpdateOptimizerRequest* req,
                                            v1::Model* resp) override;
  grpc::ServerUnaryReactor* SaveModel(grpc::CallbackServerContext* ctx,
                                      const v1::SaveModelRequest* req,
                                      v1::SaveModelResponse* resp) override;
  // Per-layer frozen/trainable flags (core Model::SetLayerOptions): exclusive access; a change
  // of a frozen flag releases the retained forwards.
  grpc::ServerUnaryReactor* SetLayerOptions(grpc::CallbackServerContext* ctx,
                                            const v1::SetLayerOptionsRequest* req,
                                            v1::Model* resp) override;
  // The folded spec and state (core FoldBatchNorm) under shared access; with new_model also an
  // inference-only model in eval mode holding them.
  grpc::ServerUnaryReactor* FoldBatchNorm(grpc::CallbackServerContext* ctx,
                                          const v1::FoldBatchNormRequest* req,
                                          v1::FoldBatchNormResponse* resp) override;
  // AdaBN over a client stream (core Model::AccumulateStatistics / CommitStatistics): each
  // batch is accumulated under shared access (eval Forwards go on meanwhile), the new running
  // statistics are committed under exclusive access when the client half-closes, so concurrent
  // readers see the old or the new statistics, never a mix. Any error, a cancel or a shutdown
  // before the commit leaves the model untouched.
  grpc::ServerReadReactor<v1::AdaptStatisticsRequest>* AdaptStatistics(
      grpc::CallbackServerContext* ctx, v1::Model* resp) override;
  // Every rank's digest of its replicas (DataParallelJob::CheckReplicas); a single process
  // answers world_size 1, its own digest, consistent. Admins only (it reads every tenant).
  grpc::ServerUnaryReactor* CheckReplicas(grpc::CallbackServerContext* ctx,
                                          const v1::CheckReplicasRequest* req,
                                          v1::CheckReplicasResponse* resp) override;

 private:
  friend class AdaptStatisticsReactor;
  friend class TrainStreamReactor;
  class Call;

  // Runs `body` on the model's queue with the access `want` resolves to, holding the model's
  // mutex that way, and finishes the call with its status.
  void RunOnModel(const std::shared_ptr<Call>& call, const std::string& model_id,
                  ModelEntry::Want want,
                  std::function<Status(ModelEntry&, ModelEntry::Access)> body) {
    RunOnModel(call, model_id, want, /*inline_batch=*/0, std::move(body));
  }
  // The same for a forward of `inline_batch` samples: when that is tiny for the model (see
  // kInlineMaxCost in service.cc), few calls are in flight and the model is free, `body` runs
  // at once on the calling gRPC thread, in the order and with the access the queue would have
  // given it.
  void RunOnModel(const std::shared_ptr<Call>& call, const std::string& model_id,
                  ModelEntry::Want want, int64_t inline_batch,
                  std::function<Status(ModelEntry&, ModelEntry::Access)> body);

  // One TrainStep on `entry` (exclusive access held). Shared by TrainStep and TrainStream.
  Status DoTrainStep(ModelEntry& entry, const v1::TrainStepRequest& req,
                     const DecodedTensor& input, const DecodedTargets& targets,
                     v1::TrainStepResponse* resp);
  // Decodes a TrainStep's input and targets and checks the batch limits. `targets` may point
  // into `req`.
  Status DecodeTrainStep(const ModelEntry& entry, const v1::TrainStepRequest& req,
                         DecodedTensor* input, DecodedTargets* targets) const;
  Status CheckBatch(const ModelEntry& entry, const ConstTensorView& x) const;
  // Adds a SmallBatchWarning per BatchNorm layer whose statistics in rec's train-mode forward
  // came from fewer values per channel than the server's small_batch_threshold, and counts it.
  void WarnSmallBatches(ModelEntry& entry, const ForwardRecord& rec,
                        google::protobuf::RepeatedPtrField<v1::SmallBatchWarning>* out) const;
  // Counts a change to the model (exclusive access held) and tells persistence what it was.
  void RecordMutation(ModelEntry& entry, Mutation what);

  // Whether a new call may run, and for whom (*who): the authenticator's refusal first, then
  // UNAVAILABLE while shutting down, else OK.
  grpc::Status Admit(const grpc::CallbackServerContext* ctx, Principal* who) const;

  void AddStream(TrainStreamReactor* s);
  void RemoveStream(TrainStreamReactor* s);
  // Every unary call and stream counts from its start until it is finished.
  void CallStarted();
  void CallFinished();
  // True while few calls are in flight (see kInlineMaxCallsInFlight in service.cc).
  bool FewCallsInFlight();

  Registry* const registry_;
  Metrics* const metrics_;
  ComputePool* const pool_;
  const Authenticator* const auth_;
  DataParallelJob* const dp_;
  std::atomic<bool> shutting_down_{false};

  std::mutex streams_mu_;
  std::set<TrainStreamReactor*> streams_;  // GUARDED_BY(streams_mu_)

  std::mutex inflight_mu_;
  std::condition_variable inflight_cv_;
  int inflight_ = 0;  // GUARDED_BY(inflight_mu_)
};

}  // namespace normd::server

#endif  // NORMD_SERVER_SERVICE_H_
