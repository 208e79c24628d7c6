#include "server/service.h"

#include <malloc.h>
#include <spdlog/spdlog.h>

#include <chrono>
#include <functional>
#include <memory>
#include <utility>

#include "server/convert.h"
#include "server/data_parallel.h"
#include "server/security.h"
#include "server/status_map.h"

namespace normd::server {
namespace {

using Access = ModelEntry::Access;
using Want = ModelEntry::Want;
using Clock = std::chrono::steady_clock;

Status ShuttingDown() {
  return Status(StatusCode::kUnavailable, "the server is shutting down");
}

Status Deleted(const ModelEntry& entry) {
  return NotFound("model '", entry.id(), "' not found (it was deleted)");
}

const char* ModeName(bool training) { return training ? "train" : "eval"; }

// Forwards and Evaluates estimated at no more multiply-adds than this (the model's
// forward_cost_per_sample times the batch) run on the gRPC thread that decoded them, when their
// model is free, instead of on the ComputePool: the hand-off there and back costs more than the
// work (tens of microseconds where waking an idle vCPU is slow, against a few for 64 Ki
// multiply-adds), and work this small cannot hold up gRPC's threads.
constexpr int64_t kInlineMaxCost = int64_t{1} << 16;

// Inline work only while at most this many calls are in flight (this one included). With many
// concurrent calls, work done on gRPC's threads holds up their polling of the other
// connections: eval Forward of the small model from 8 clients measured 30.1 k QPS through the
// pool and 26.3 k inline, against p50 109 -> 84 us inline for one client.
constexpr int kInlineMaxCallsInFlight = 2;

// The batch of a decoded input, for the inline decision: 0 (never inline) for a 0-d tensor,
// which the core rejects anyway.
int64_t BatchOf(const DecodedTensor& t) {
  return t.view().shape.rank() > 0 ? t.view().shape[0] : 0;
}

}  // namespace

// A unary call's reactor. The call counts as in flight (TrainerService::WaitIdle) until gRPC is
// done with it, its status sent, not merely until Finish was called: a shutdown that cancelled
// every call right after the last Finish could turn an answer on its way into CANCELLED.
class UnaryReactor final : public grpc::ServerUnaryReactor {
 public:
  explicit UnaryReactor(std::function<void()> on_done) : on_done_(std::move(on_done)) {}
  void OnDone() override {
    on_done_();
    delete this;
  }

 private:
  const std::function<void()> on_done_;
};

// One unary RPC in flight: its reactor, its clock, and the single place that finishes it and
// records its metrics. Shared by the handler and the task that completes it.
class TrainerService::Call {
 public:
  Call(TrainerService* service, grpc::CallbackServerContext* ctx, Rpc rpc)
      : service_(service), ctx_(ctx), rpc_(rpc),
        reactor_(new UnaryReactor([service] { service->CallFinished(); })),
        start_(Clock::now()) {
    service_->CallStarted();
  }

  grpc::ServerUnaryReactor* reactor() const { return reactor_; }
  bool cancelled() const { return ctx_->IsCancelled(); }

  // Finishes the call when it may not run (TrainerService::Admit); true when it did. Otherwise
  // who() is the caller from now on.
  bool FinishIfRefused() {
    const grpc::Status refused = service_->Admit(ctx_, &who_);
    if (refused.ok()) {
      tenant_metrics_ = service_->metrics_->Tenant(who_.tenant);
      return false;
    }
    FinishGrpc(refused);
    return true;
  }

  const Principal& who() const { return who_; }

  void Finish(const Status& status) { FinishGrpc(ToGrpcStatus(status)); }
  void FinishGrpc(const grpc::Status& status) {
    const double seconds = std::chrono::duration<double>(Clock::now() - start_).count();
    service_->metrics_->RecordRpc(rpc_, status.error_code(), seconds);
    if (tenant_metrics_ != nullptr) tenant_metrics_->RecordCall(status.error_code());
    reactor_->Finish(status);
  }

 private:
  TrainerService* const service_;
  grpc::CallbackServerContext* const ctx_;
  const Rpc rpc_;
  grpc::ServerUnaryReactor* const reactor_;
  const Clock::time_point start_;
  Principal who_;
  TenantMetrics* tenant_metrics_ = nullptr;  // set once admitted
};

// TrainStream: answers each message in order and ends the stream with the first error.
//
// The reactor reads ahead: while message k computes, message k+1 is read and decoded on a gRPC
// thread, so the transfer and parse of the next batch overlap the current step. Steps still run
// one at a time, strictly in order: message k+1 is queued on its model only once message k has
// succeeded (from the end of k's task), so a failed message stops every later one from running
// exactly as if nothing had been read ahead, whichever models they name. At most kDepth messages
// are held (read, waiting, running or having their response written); each owns one slot, so
// the decoded views of a message stay valid until its response has been written.
//
// Messages are numbered in arrival order; [written_, read_) are held, of which [ran_, read_)
// have not finished computing and [written_, ran_) have a response to write. The stream
// finishes only when no task is running, so no pool thread can touch the reactor after OnDone.
// The reactor deletes itself in OnDone.
//
// Messages arrive and leave as bytes (see TrainerServiceBase): one that does not parse fails like
// one that does not decode, ending the stream with INVALID_ARGUMENT once those before it are
// answered.
class TrainStreamReactor : public grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer> {
 public:
  TrainStreamReactor(TrainerService* service, grpc::CallbackServerContext* ctx)
      : service_(service), ctx_(ctx), start_(Clock::now()) {
    service_->CallStarted();
    service_->AddStream(this);
    std::lock_guard<std::mutex> lock(mu_);
    const grpc::Status refused = service_->Admit(ctx_, &who_);
    if (!refused.ok()) {
      FinishLocked(refused);
      return;
    }
    tenant_metrics_ = service_->metrics_->Tenant(who_.tenant);
    AdvanceLocked();
  }

  void OnReadDone(bool ok) override {
    Slot* slot;
    uint64_t read_index;  // 1-based, for messages
    {
      std::lock_guard<std::mutex> lock(mu_);
      reading_ = false;
      if (!ok) {
        // The client half-closed (answer what is held, then finish) or the call was cancelled.
        read_closed_ = true;
        AdvanceLocked();
        return;
      }
      if (finished_) return;
      decoding_ = true;
      read_index = read_ + 1;
      slot = &SlotOf(read_);
    }
    // Decoding needs no lock: the slot belongs to this message until read_ moves past it, and
    // decoding_ keeps another read out of it and the stream from finishing meanwhile.
    std::shared_ptr<ModelEntry> entry;
    Status s;
    if (!grpc::SerializationTraits<v1::TrainStepRequest>::Deserialize(&slot->in, &slot->req)
             .ok()) {
      s = InvalidArgument("TrainStream message ", read_index,
                          " does not parse as normd.v1.TrainStepRequest");
    }
    if (s.ok()) s = service_->registry_->Find(who_, slot->req.model(), &entry);
    if (s.ok()) s = service_->DecodeTrainStep(*entry, slot->req, &slot->input, &slot->targets);
    slot->entry = s.ok() ? std::move(entry) : nullptr;
    slot->decoded = s;
    std::lock_guard<std::mutex> lock(mu_);
    decoding_ = false;
    ++read_;
    AdvanceLocked();
  }

  void OnWriteDone(bool ok) override {
    std::lock_guard<std::mutex> lock(mu_);
    writing_ = false;
    if (!ok) {
      write_failed_ = true;  // the client went away: nothing more can be answered
    } else {
      SlotOf(written_).Clear();
      ++written_;
    }
    AdvanceLocked();
  }

  void OnDone() override {
    // After RemoveStream no shutdown sweep can reach this reactor, and once mu_ has been taken
    // no thread that finished it is still inside one of its methods.
    service_->RemoveStream(this);
    service_->CallFinished();  // only now: the status has been sent (see UnaryReactor)
    grpc::StatusCode code;
    {
      std::lock_guard<std::mutex> lock(mu_);
      code = code_;
    }
    const double seconds = std::chrono::duration<double>(Clock::now() - start_).count();
    service_->metrics_->RecordRpc(Rpc::kTrainStream, code, seconds);
    if (tenant_metrics_ != nullptr) tenant_metrics_->RecordCall(code);
    delete this;
    // The slots held two requests (megabytes each for large batches) on gRPC threads' heaps,
    // which glibc would keep: give the freed pages back, as a deleted model does.
    malloc_trim(0);
  }

  // At shutdown: no further message is read; a stream with nothing held ends now (UNAVAILABLE),
  // one with messages held ends after answering them.
  void FinishIfIdle() {
    std::lock_guard<std::mutex> lock(mu_);
    AdvanceLocked();
  }

 private:
  static constexpr uint64_t kDepth = 2;

  struct Slot {
    grpc::ByteBuffer in;   // the message as read
    grpc::ByteBuffer out;  // resp serialized, while it is written
    v1::TrainStepRequest req;
    v1::TrainStepResponse resp;
    DecodedTensor input;  // views into req
    DecodedTargets targets;
    std::shared_ptr<ModelEntry> entry;
    Status decoded;  // Find and DecodeTrainStep's verdict

    void Clear() {
      entry.reset();
      resp.Clear();
      out.Clear();
    }
  };

  Slot& SlotOf(uint64_t message) { return slots_[message % kDepth]; }

  // Makes every move the state allows: run the next step, write the next response, read the
  // next message, or finish. Called after every change of the state.
  void AdvanceLocked() {
    if (finished_) return;
    if (!running_ && !failed_ && !write_failed_ && ran_ < read_) StartStepLocked();
    if (!writing_ && !write_failed_ && written_ < ran_) {
      Slot& slot = SlotOf(written_);
      bool own_buffer;
      grpc::SerializationTraits<v1::TrainStepResponse>::Serialize(slot.resp, &slot.out,
                                                                  &own_buffer);
      writing_ = true;
      StartWrite(&slot.out);
    }
    if (!failed_ && !write_failed_ && !service_->shutting_down_.load()) StartReadLocked();
    if (running_ || writing_ || decoding_) return;
    // Nothing in progress, so every held message has been answered: is the stream over?
    if (write_failed_) {
      FinishLocked(grpc::Status(grpc::StatusCode::CANCELLED, "the stream was cancelled"));
    } else if (failed_) {
      FinishLocked(failure_);
    } else if (read_closed_) {
      FinishLocked(ctx_->IsCancelled()
                       ? grpc::Status(grpc::StatusCode::CANCELLED, "the stream was cancelled")
                       : grpc::Status::OK);
    } else if (service_->shutting_down_.load()) {
      FinishLocked(ToGrpcStatus(ShuttingDown()));
    }
  }

  // Called also while a step runs or a response is written: that is the read-ahead.
  void StartReadLocked() {
    if (reading_ || decoding_ || read_closed_ || read_ - written_ >= kDepth) return;
    reading_ = true;
    StartRead(&SlotOf(read_).in);
  }

  // Queues message ran_ on its model. REQUIRES: !running_, ran_ < read_.
  void StartStepLocked() {
    Slot& slot = SlotOf(ran_);
    if (ctx_->IsCancelled()) {
      // The client is gone: the message was read ahead but is not run, as a unary call that
      // was cancelled while it waited.
      return Fail(grpc::Status(grpc::StatusCode::CANCELLED, "the stream was cancelled"));
    }
    Status s = slot.decoded;
    if (s.ok()) {
      std::shared_ptr<ModelEntry> entry = slot.entry;
      s = entry->Schedule(entry, Want::kExclusive, [this, &slot, entry](Access) {
        Status st;
        {
          std::unique_lock<std::shared_mutex> lock(entry->mu());
          st = entry->deleted()
                   ? Deleted(*entry)
                   : service_->DoTrainStep(*entry, slot.req, slot.input, slot.targets, &slot.resp);
        }
        std::lock_guard<std::mutex> lock(mu_);
        running_ = false;
        if (st.ok()) {
          ++ran_;
        } else {
          Fail(ToGrpcStatus(st));
        }
        AdvanceLocked();
      });
    }
    if (s.ok()) {
      running_ = true;
    } else {
      Fail(ToGrpcStatus(s));
    }
  }

  void Fail(const grpc::Status& s) {
    failed_ = true;
    failure_ = s;
  }

  void FinishLocked(const grpc::Status& s) {
    finished_ = true;
    code_ = s.error_code();
    Finish(s);
  }

  TrainerService* const service_;
  grpc::CallbackServerContext* const ctx_;
  const Clock::time_point start_;
  Principal who_;                            // written before the first read
  TenantMetrics* tenant_metrics_ = nullptr;  // set once admitted

  std::mutex mu_;
  Slot slots_[kDepth];      // GUARDED_BY(mu_), except a slot's fields while its owner decodes it
  uint64_t read_ = 0;       // GUARDED_BY(mu_): messages received
  uint64_t ran_ = 0;        // GUARDED_BY(mu_): messages computed successfully
  uint64_t written_ = 0;    // GUARDED_BY(mu_): responses written
  bool reading_ = false;    // GUARDED_BY(mu_): a read is outstanding
  bool decoding_ = false;   // GUARDED_BY(mu_): message read_ arrived and is being decoded
  bool running_ = false;    // GUARDED_BY(mu_): message ran_ is queued or computing
  bool writing_ = false;    // GUARDED_BY(mu_): response written_ is being written
  bool read_closed_ = false;   // GUARDED_BY(mu_): no more messages (half-close or cancel)
  bool failed_ = false;        // GUARDED_BY(mu_): message ran_ failed with failure_
  bool write_failed_ = false;  // GUARDED_BY(mu_)
  grpc::Status failure_;       // GUARDED_BY(mu_)
  bool finished_ = false;      // GUARDED_BY(mu_)
  grpc::StatusCode code_ = grpc::StatusCode::OK;  // GUARDED_BY(mu_) until OnDone
};

// AdaptStatistics: reads one batch at a time, accumulates it on the model's queue with shared
// access, and reads the next only when that is done; at the client's half-close it commits
// with exclusive access and answers the model. The first error ends the call with nothing
// changed. The reactor deletes itself in OnDone, which gRPC calls only after Finish, and Finish
// is called only when no task of this call is queued or running.
class AdaptStatisticsReactor : public grpc::ServerReadReactor<v1::AdaptStatisticsRequest> {
 public:
  AdaptStatisticsReactor(TrainerService* service, grpc::CallbackServerContext* ctx,
                         v1::Model* resp)
      : service_(service), ctx_(ctx), resp_(resp), start_(Clock::now()) {
    service_->CallStarted();
    const grpc::Status refused = service_->Admit(ctx_, &who_);
    if (!refused.ok()) {
      Done(refused);
      return;
    }
    tenant_metrics_ = service_->metrics_->Tenant(who_.tenant);
    StartRead(&req_);
  }

  void OnReadDone(bool ok) override {
    if (!ok) {
      // Half-close (commit) or cancel (nothing changes).
      if (ctx_->IsCancelled()) return Done(Cancelled());
      return Commit();
    }
    ++messages_;
    if (service_->shutting_down_.load()) return Done(ToGrpcStatus(ShuttingDown()));
    Status s;
    if (entry_ == nullptr) {
      if (req_.model().empty()) {
        s = InvalidArgument("the first AdaptStatistics message must name the model");
      } else {
        s = service_->registry_->Find(who_, req_.model(), &entry_);
      }
    } else if (!req_.model().empty() && req_.model() != first_name_) {
      // Another spelling of the same model ("mlp" and "a/mlp" from tenant a) is the same model.
      std::shared_ptr<ModelEntry> named;
      if (!service_->registry_->Find(who_, req_.model(), &named).ok() || named != entry_) {
        s = InvalidArgument("AdaptStatistics message ", messages_, " names model '",
                            req_.model(), "' but the stream adapts '", first_name_, "'");
      }
    }
    if (s.ok() && first_name_.empty()) first_name_ = req_.model();
    if (s.ok() && !req_.has_input()) {
      s = InvalidArgument("AdaptStatistics message ", messages_, ": input is required");
    }
    if (s.ok()) {
      s = DecodeTensor(req_.input(), "input", service_->registry_->limits().max_batch_elements,
                       &input_);
    }
    if (s.ok()) s = service_->CheckBatch(*entry_, input_.view());
    if (!s.ok()) return Done(ToGrpcStatus(s.WithPrefix(StrCat("message ", messages_))));
    std::shared_ptr<ModelEntry> entry = entry_;
    s = entry->Schedule(entry, Want::kShared, [this, entry](Access) {
      Status st;
      {
        std::shared_lock<std::shared_mutex> lock(entry->mu());
        st = entry->deleted() ? Deleted(*entry)
                              : entry->model().AccumulateStatistics(input_.view(), &acc_);
      }
      if (!st.ok()) return Done(ToGrpcStatus(st.WithPrefix(StrCat("message ", messages_))));
      if (ModelMetrics* m = entry->metrics()) m->AddSamples(SampleOp::kForward, input_.view().rows());
      StartRead(&req_);
    });
    if (!s.ok()) Done(ToGrpcStatus(s));
  }

  void OnDone() override {
    service_->CallFinished();
    const double seconds = std::chrono::duration<double>(Clock::now() - start_).count();
    service_->metrics_->RecordRpc(Rpc::kAdaptStatistics, code_, seconds);
    if (tenant_metrics_ != nullptr) tenant_metrics_->RecordCall(code_);
    delete this;
  }

 private:
  static grpc::Status Cancelled() {
    return grpc::Status(grpc::StatusCode::CANCELLED, "the stream was cancelled");
  }

  void Commit() {
    if (entry_ == nullptr) {
      return Done(ToGrpcStatus(InvalidArgument(
          "AdaptStatistics received no batch: an empty stream changes nothing")));
    }
    std::shared_ptr<ModelEntry> entry = entry_;
    const Status s = entry->Schedule(entry, Want::kExclusive, [this, entry](Access) {
      if (ctx_->IsCancelled()) return Done(Cancelled());
      Status st;
      {
        std::unique_lock<std::shared_mutex> lock(entry->mu());
        if (entry->deleted()) {
          st = Deleted(*entry);
        } else {
          st = entry->model().CommitStatistics(acc_);
          if (st.ok()) {
            entry->ReleaseAllRetained(
                "released by AdaptStatistics (the statistics it used were replaced)");
            service_->RecordMutation(*entry, Mutation::kAdapt);
            entry->Publish();
            entry->ToWire(resp_);
            spdlog::info("event=statistics_adapted model={} batches={} samples={} layers={}",
                         entry->name(), acc_.batches, acc_.samples, acc_.layers.size());
          }
        }
      }
      Done(ToGrpcStatus(st));
    });
    if (!s.ok()) Done(ToGrpcStatus(s));
  }

  void Done(const grpc::Status& s) {
    code_ = s.error_code();
    Finish(s);
  }

  TrainerService* const service_;
  grpc::CallbackServerContext* const ctx_;
  v1::Model* const resp_;
  const Clock::time_point start_;
  // Touched by one thread at a time: a gRPC thread between reads, then the task it queued.
  v1::AdaptStatisticsRequest req_;
  DecodedTensor input_;  // views into req_
  std::shared_ptr<ModelEntry> entry_;
  std::string first_name_;  // the model as the first message named it
  Principal who_;
  TenantMetrics* tenant_metrics_ = nullptr;  // set once admitted
  StatisticsAccumulator acc_;
  int64_t messages_ = 0;
  grpc::StatusCode code_ = grpc::StatusCode::OK;
};

TrainerService::TrainerService(Registry* registry, Metrics* metrics, ComputePool* pool,
                               const Authenticator* auth, DataParallelJob* data_parallel)
    : registry_(registry), metrics_(metrics), pool_(pool), auth_(auth), dp_(data_parallel) {}

grpc::Status TrainerService::Admit(const grpc::CallbackServerContext* ctx, Principal* who) const {
  // The identity first: a client without one learns nothing, not even that the server drains.
  if (auth_ != nullptr) {
    grpc::Status s = auth_->Identify(*ctx, who);
    if (!s.ok()) return s;
  } else {
    *who = Principal();
  }
  if (shutting_down_.load()) return ToGrpcStatus(ShuttingDown());
  return grpc::Status::OK;
}

void TrainerService::BeginShutdown() {
  shutting_down_.store(true);
  std::lock_guard<std::mutex> lock(streams_mu_);
  for (TrainStreamReactor* s : streams_) s->FinishIfIdle();
}

bool TrainerService::WaitIdle(std::chrono::steady_clock::time_point deadline) {
  std::unique_lock<std::mutex> lock(inflight_mu_);
  return inflight_cv_.wait_until(lock, deadline, [this] { return inflight_ == 0; });
}

void TrainerService::CallStarted() {
  std::lock_guard<std::mutex> lock(inflight_mu_);
  ++inflight_;
}

bool TrainerService::FewCallsInFlight() {
  std::lock_guard<std::mutex> lock(inflight_mu_);
  return inflight_ <= kInlineMaxCallsInFlight;
}

void TrainerService::CallFinished() {
  std::lock_guard<std::mutex> lock(inflight_mu_);
  if (--inflight_ == 0) inflight_cv_.notify_all();
}

void TrainerService::AddStream(TrainStreamReactor* s) {
  std::lock_guard<std::mutex> lock(streams_mu_);
  streams_.insert(s);
}

void TrainerService::RemoveStream(TrainStreamReactor* s) {
  std::lock_guard<std::mutex> lock(streams_mu_);
  streams_.erase(s);
}

void TrainerService::RunOnModel(const std::shared_ptr<Call>& call, const std::string& model_id,
                                Want want, int64_t inline_batch,
                                std::function<Status(ModelEntry&, Access)> body) {
  std::shared_ptr<ModelEntry> entry;
  Status s = registry_->Find(call->who(), model_id, &entry);
  if (!s.ok()) return call->Finish(s);
  std::function<void(Access)> task = [call, entry, body = std::move(body)](Access access) {
    if (call->cancelled()) {
      // The client gave up (deadline or cancel) while the request waited: skip the work.
      call->FinishGrpc(grpc::Status(grpc::StatusCode::CANCELLED, "cancelled before it ran"));
      return;
    }
    Status st;
    if (access == Access::kExclusive) {
      std::unique_lock<std::shared_mutex> lock(entry->mu());
      st = entry->deleted() ? Deleted(*entry) : body(*entry, access);
    } else {
      std::shared_lock<std::shared_mutex> lock(entry->mu());
      st = entry->deleted() ? Deleted(*entry) : body(*entry, access);
    }
    call->Finish(st);
  };
  if (inline_batch > 0 &&
      SaturatingMul(inline_batch, entry->forward_cost_per_sample()) <= kInlineMaxCost &&
      FewCallsInFlight() && entry->TryRunInline(entry, want, task)) {
    return;
  }
  s = entry->Schedule(entry, want, std::move(task));
  if (!s.ok()) call->Finish(s);
}

Status TrainerService::CheckBatch(const ModelEntry& entry, const ConstTensorView& x) const {
  if (x.shape.rank() == 0) return Status::Ok();  // the core rejects it with a shape message
  const int64_t n = x.shape[0];
  const int64_t need = SaturatingMul(n, entry.max_sample_elements());
  const int64_t limit = registry_->limits().max_batch_elements;
  if (need > limit) {
    return ResourceExhausted("a batch of ", n, " samples needs activations of ", need,
                             " elements in model '", entry.id(), "', more than the limit of ",
                             limit, " (--max-batch-elements)");
  }
  return Status::Ok();
}

void TrainerService::WarnSmallBatches(
    ModelEntry& entry, const ForwardRecord& rec,
    google::protobuf::RepeatedPtrField<v1::SmallBatchWarning>* out) const {
  const int64_t threshold = registry_->limits().small_batch_threshold;
  for (const SmallBatchReport& r : entry.model().SmallBatches(rec, threshold)) {
    v1::SmallBatchWarning* w = out->Add();
    w->set_layer(r.name);
    w->set_values_per_channel(r.values_per_channel);
    const char* kind = entry.model().net().node(r.layer).layer->kind_name();
    w->set_message(StrCat("layer '", r.name, "' (", kind,
                          ") normalised this training batch with statistics over ",
                          r.values_per_channel, " values per channel, fewer than ", threshold,
                          " (--small-batch-threshold): its batch statistics are noisy and "
                          "training may be unstable; use larger batches, or GroupNorm or "
                          "LayerNorm, which do not depend on the batch"));
    if (ModelMetrics* m = entry.metrics()) m->RecordSmallBatch(r.layer);
  }
}

Status TrainerService::DecodeTrainStep(const ModelEntry& entry, const v1::TrainStepRequest& req,
                                       DecodedTensor* input, DecodedTargets* targets) const {
  const int64_t limit = registry_->limits().max_batch_elements;
  if (!req.has_input()) return InvalidArgument("input is required");
  NORMD_RETURN_IF_ERROR(DecodeTensor(req.input(), "input", limit, input));
  NORMD_RETURN_IF_ERROR(CheckBatch(entry, input->view()));
  return DecodeTargets(req.labels(), req.has_target() ? &req.target() : nullptr, limit, targets);
}

Status TrainerService::DoTrainStep(ModelEntry& entry, const v1::TrainStepRequest& req,
                                   const DecodedTensor& input, const DecodedTargets& targets,
                                   v1::TrainStepResponse* resp) {
  Model& model = entry.model();
  // Before TrainStep: its other FAILED_PRECONDITIONs are refused non-finite steps (counted).
  NORMD_RETURN_IF_ERROR(model.CheckCanTrain("TrainStep"));
  TrainResult r;
  Status s = dp_ != nullptr
                 ? dp_->TrainStep(entry, req, input, targets, &r)
                 : model.TrainStep(input.view(), targets.targets, &entry.train_record, &r);
  if (!s.ok()) {
    if (s.code() == StatusCode::kFailedPrecondition) {
      // Non-finite loss or gradients: refused, parameters untouched, gradients cleared.
      entry.pending_backwards = 0;
      if (ModelMetrics* m = entry.metrics()) m->RecordNonFiniteStep();
    }
    return s;
  }
  entry.pending_backwards = 0;
  if (ModelMetrics* m = entry.metrics()) {
    m->AddSamples(SampleOp::kTrain, r.samples);
    m->RecordStep(&r.loss, r.grad_norm);
    m->RecordDrift(entry.train_record, model.training());
  }
  RecordMutation(entry, Mutation::kStep);
  entry.PublishForward(entry.train_record);
  resp->set_loss(r.loss);
  resp->set_step(r.step);
  resp->set_samples(r.samples);
  resp->set_grad_norm(r.grad_norm);
  resp->set_learning_rate(r.learning_rate);
  WarnSmallBatches(entry, entry.train_record, resp->mutable_warnings());
  return Status::Ok();
}

// --- Model lifecycle ---------------------------------------------------------------------------

grpc::ServerUnaryReactor* TrainerService::CreateModel(grpc::CallbackServerContext* ctx,
                                                      const v1::CreateModelRequest* req,
                                                      v1::Model* resp) {
  auto call = std::make_shared<Call>(this, ctx, Rpc::kCreateModel);
  grpc::ServerUnaryReactor* reactor = call->reactor();
  if (call->FinishIfRefused()) return reactor;
  // Building allocates and initialises every parameter: pool work, not a gRPC thread's.
  pool_->Submit(call->who().tenant, [this, call, req, resp] {
    if (call->cancelled()) {
      call->FinishGrpc(grpc::Status(grpc::StatusCode::CANCELLED, "cancelled before it ran"));
      return;
    }
    std::shared_ptr<ModelEntry> entry;
    Status s = registry_->Create(call->who(), req->id(), req->spec(), &entry);
    if (s.ok()) {
      entry->ToWire(resp);
      spdlog::info("event=model_created model={} layers={} parameters={} mode=train models={}",
                   entry->name(), resp->spec().layers_size(), resp->parameter_count(),
                   registry_->size());
    }
    call->Finish(s);
  });
  return reactor;
}

grpc::ServerUnaryReactor* TrainerService::GetModel(grpc::CallbackServerContext* ctx,
                                                   const v1::GetModelRequest* req,
                                                   v1::Model* resp) {
  auto call = std::make_shared<Call>(this, ctx, Rpc::kGetModel);
  if (call->FinishIfRefused()) return call->reactor();
  std::shared_ptr<ModelEntry> entry;
  Status s = registry_->Find(call->who(), req->model(), &entry);
  if (s.ok()) entry->ToWire(resp);
  grpc::ServerUnaryReactor* reactor = call->reactor();
  call->Finish(s);
  return reactor;
}

grpc::ServerUnaryReactor* TrainerService::ListModels(grpc::CallbackServerContext* ctx,
                                                     const v1::ListModelsRequest* /*req*/,
                                                     v1::ListModelsResponse* resp) {
  auto call = std::make_shared<Call>(this, ctx, Rpc::kListModels);
  grpc::ServerUnaryReactor* reactor = call->reactor();
  if (call->FinishIfRefused()) return reactor;
  for (const std::shared_ptr<ModelEntry>& e : registry_->List(call->who())) {
    e->ToWire(resp->add_models());
  }
  call->Finish(Status::Ok());
  return reactor;
}

grpc::ServerUnaryReactor* TrainerService::DeleteModel(grpc::CallbackServerContext* ctx,
                                                      const v1::DeleteModelRequest* req,
                                                      v1::DeleteModelResponse* /*resp*/) {
  auto call = std::make_shared<Call>(this, ctx, Rpc::kDeleteModel);
  grpc::ServerUnaryReactor* reactor = call->reactor();
  if (call->FinishIfRefused()) return reactor;
  RunOnModel(call, req->model(), Want::kExclusive, [this](ModelEntry& e, Access) {
    const uint64_t step = e.model().step();
    NORMD_RETURN_IF_ERROR(registry_->Remove(e));
    spdlog::info("event=model_deleted model={} step={} models={}", e.name(), step,
                 registry_->size());
    return Status::Ok();
  });
  return reactor;
}

grpc::ServerUnaryReactor* TrainerService::SetMode(grpc::CallbackServerContext* ctx,
                                                  const v1::SetModeRequest* req,
                                                  v1::Model* resp) {
  auto call = std::make_shared<Call>(this, ctx, Rpc::kSetMode);
  grpc::ServerUnaryReactor* reactor = call->reactor();
  if (call->FinishIfRefused()) return reactor;
  if (req->mode() != v1::MODE_TRAIN && req->mode() != v1::MODE_EVAL) {
    call->Finish(InvalidArgument("mode must be MODE_TRAIN or MODE_EVAL, got ",
                                 v1::Mode_Name(req->mode()).empty()
                                     ? std::to_string(req->mode())
                                     : v1::Mode_Name(req->mode())));
    return reactor;
  }
  RunOnModel(call, req->model(), Want::kExclusive, [this, req, resp](ModelEntry& e, Access) {
    Model& model = e.model();
    const bool training = req->mode() == v1::MODE_TRAIN;
    if (training) NORMD_RETURN_IF_ERROR(model.CheckCanTrain("SetMode(MODE_TRAIN)"));
    // freeze_running_stats is optional: unset keeps the current setting.
    const bool freeze = req->has_freeze_running_stats() ? req->freeze_running_stats()
                                                        : model.running_stats_frozen();
    const bool was_training = model.training();
    const bool was_frozen = model.running_stats_frozen();
    model.SetMode(training, freeze);
    if (dp_ != nullptr) dp_->Replicate(e, DataParallelJob::Control::kSetMode, *req);
    RecordMutation(e, Mutation::kMode);
    e.Publish();
    e.ToWire(resp);
    spdlog::info("event=mode_set model={} mode={} frozen={} previous_mode={} previous_frozen={} "
                 "step={}",
                 e.name(), ModeName(training), freeze, ModeName(was_training), was_frozen,
                 model.step());
    return Status::Ok();
  });
  return reactor;
}

void TrainerService::RecordMutation(ModelEntry& entry, Mutation what) {
  ++entry.mutations;
  if (Persistence* p = registry_->persistence()) p->OnMutation(entry, what);
}

// --- Compute -----------------------------------------------------------------------------------

grpc::ServerUnaryReactor* TrainerService::Forward(grpc::CallbackServerContext* ctx,
                                                  const v1::ForwardRequest* req,
                                                  v1::ForwardResponse* resp) {
  auto call = std::make_shared<Call>(this, ctx, Rpc::kForward);
  grpc::ServerUnaryReactor* reactor = call->reactor();
  if (call->FinishIfRefused()) return reactor;
  auto input = std::make_shared<DecodedTensor>();
  Status s = req->has_input() ? DecodeTensor(req->input(), "input",
                                             registry_->limits().max_batch_elements, input.get())
                              : InvalidArgument("input is required");
  if (!s.ok()) {
    call->Finish(s);
    return reactor;
  }
  RunOnModel(call, req->model(), Want::kByMode, BatchOf(*input),
             [this, req, resp, input](ModelEntry& e, Access access) {
    Model& model = e.model();
    const bool training = model.training();
    if (training && access != Access::kExclusive) {
      // The queue grants train-mode forwards exclusive access; this would be a scheduler bug.
      return Status(StatusCode::kInternal, "train-mode forward scheduled without exclusive access");
    }
    NORMD_RETURN_IF_ERROR(CheckBatch(e, input->view()));
    const bool retain = req->retain_for_backward();
    if (retain) NORMD_RETURN_IF_ERROR(model.CheckCanTrain("Forward with retain_for_backward"));
    if (retain) NORMD_RETURN_IF_ERROR(e.ReserveRetained());
    std::unique_ptr<ForwardRecord> rec = e.AcquireRecord();
    // In a data-parallel job every forward is split over the ranks (rec holds rank 0's shard,
    // `whole` the whole batch's output): eval-mode ones too (data_parallel.h says why).
    const bool distributed = dp_ != nullptr;
    Tensor whole;
    std::vector<LayerActivationStats> whole_stats;  // distributed: the whole batch's
    Status st = distributed ? dp_->Forward(e, *req, *input, rec.get(), &whole, &whole_stats)
                            : model.Forward(input->view(), rec.get());
    if (!st.ok()) {
      if (retain) e.CancelReservation();
      e.ReleaseRecord(std::move(rec));
      return st;
    }
    const Tensor& out = distributed ? whole : rec->output();
    EncodeTensor(out.data(), out.shape(), input->raw(), resp->mutable_output());
    if (req->layer_stats()) {
      LayerStatsToWire(model.net(), distributed ? whole_stats : model.net().ActivationStats(*rec),
                       resp->mutable_layer_stats());
    }
    if (ModelMetrics* m = e.metrics()) {
      // The whole batch's rows (rec holds rank 0's shard in a job).
      m->AddSamples(SampleOp::kForward, input->view().rows());
      m->RecordDrift(*rec, training);
    }
    if (training) {
      // Running statistics (and dropout's generator) moved.
      RecordMutation(e, Mutation::kForward);
      WarnSmallBatches(e, *rec, resp->mutable_warnings());
    }
    e.PublishForward(*rec);
    if (retain) {
      rec->RetainInput();  // the request's buffer goes away with the request
      resp->set_forward_id(e.CommitRetained(std::move(rec)));
    } else {
      e.ReleaseRecord(std::move(rec));
    }
    return Status::Ok();
  });
  return reactor;
}

grpc::ServerUnaryReactor* TrainerService::Backward(grpc::CallbackServerContext* ctx,
                                                   const v1::BackwardRequest* req,
                                                   v1::BackwardResponse* resp) {
  auto call = std::make_shared<Call>(this, ctx, Rpc::kBackward);
  grpc::ServerUnaryReactor* reactor = call->reactor();
  if (call->FinishIfRefused()) return reactor;
  auto grad = std::make_shared<DecodedTensor>();
  Status s = req->has_grad_output()
                 ? DecodeTensor(req->grad_output(), "grad_output",
                                registry_->limits().max_batch_elements, grad.get())
                 : InvalidArgument("grad_output is required");
  if (!s.ok()) {
    call->Finish(s);
    return reactor;
  }
  RunOnModel(call, req->model(), Want::kExclusive, [this, req, resp, grad](ModelEntry& e, Access) {
    const uint64_t id = req->forward_id();
    NORMD_RETURN_IF_ERROR(e.model().CheckCanTrain("Backward"));
    std::unique_ptr<ForwardRecord> rec;
    NORMD_RETURN_IF_ERROR(e.TakeRetained(id, &rec));
    Tensor grad_input;
    Status st = dp_ != nullptr
                    ? dp_->Backward(e, *req, rec.get(), grad->view(),
                                    req->return_grad_input() ? &grad_input : nullptr)
                    : e.model().Backward(rec.get(), grad->view(),
                                         req->return_grad_input() ? &grad_input : nullptr);
    if (!st.ok()) {
      if (st.code() == StatusCode::kFailedPrecondition) {
        e.NoteReleased(id, st.message());  // stale: it can never be used again
        e.ReleaseRecord(std::move(rec));
      } else {
        e.PutBackRetained(id, std::move(rec));  // a bad grad_output: the client may retry
      }
      return st;
    }
    e.NoteReleased(id, "released by its Backward (a retained forward takes one Backward)");
    if (req->return_grad_input()) {
      EncodeTensor(grad_input.data(), grad_input.shape(), grad->raw(), resp->mutable_grad_input());
    }
    if (ModelMetrics* m = e.metrics()) {
      m->AddSamples(SampleOp::kBackward, dp_ != nullptr ? rec->context().shard.global_rows
                                                        : rec->batch_size());
    }
    ++e.pending_backwards;
    e.ReleaseRecord(std::move(rec));
    return Status::Ok();
  });
  return reactor;
}

grpc::ServerUnaryReactor* TrainerService::ApplyGradients(grpc::CallbackServerContext* ctx,
                                                         const v1::ApplyGradientsRequest* req,
                                                         v1::ApplyGradientsResponse* resp) {
  auto call = std::make_shared<Call>(this, ctx, Rpc::kApplyGradients);
  grpc::ServerUnaryReactor* reactor = call->reactor();
  if (call->FinishIfRefused()) return reactor;
  RunOnModel(call, req->model(), Want::kExclusive, [this, resp](ModelEntry& e, Access) {
    NORMD_RETURN_IF_ERROR(e.model().CheckCanTrain("ApplyGradients"));
    if (e.pending_backwards == 0) {
      return FailedPrecondition("model '", e.id(), "' has no accumulated gradients: run Backward "
                                "on a retained forward first");
    }
    StepResult r;
    Status st = dp_ != nullptr ? dp_->ApplyGradients(e, &r) : e.model().ApplyGradients(&r);
    e.pending_backwards = 0;  // applied, or discarded by the refused step
    if (!st.ok()) {
      if (st.code() == StatusCode::kFailedPrecondition) {
        if (ModelMetrics* m = e.metrics()) m->RecordNonFiniteStep();
      }
      return st;
    }
    if (ModelMetrics* m = e.metrics()) m->RecordStep(nullptr, r.grad_norm);
    RecordMutation(e, Mutation::kStep);
    e.Publish();
    resp->set_step(r.step);
    resp->set_grad_norm(r.grad_norm);
    resp->set_learning_rate(r.learning_rate);
    return Status::Ok();
  });
  return reactor;
}

grpc::ServerUnaryReactor* TrainerService::TrainStep(grpc::CallbackServerContext* ctx,
                                                    const v1::TrainStepRequest* req,
                                                    v1::TrainStepResponse* resp) {
  auto call = std::make_shared<Call>(this, ctx, Rpc::kTrainStep);
  grpc::ServerUnaryReactor* reactor = call->reactor();
  if (call->FinishIfRefused()) return reactor;
  std::shared_ptr<ModelEntry> entry;
  Status s = registry_->Find(call->who(), req->model(), &entry);
  auto input = std::make_shared<DecodedTensor>();
  auto targets = std::make_shared<DecodedTargets>();
  if (s.ok()) s = DecodeTrainStep(*entry, *req, input.get(), targets.get());
  if (!s.ok()) {
    call->Finish(s);
    return reactor;
  }
  RunOnModel(call, req->model(), Want::kExclusive,
             [this, req, resp, input, targets](ModelEntry& e, Access) {
               return DoTrainStep(e, *req, *input, *targets, resp);
             });
  return reactor;
}

grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* TrainerService::TrainStream(
    grpc::CallbackServerContext* ctx) {
  return new TrainStreamReactor(this, ctx);
}

grpc::ServerUnaryReactor* TrainerService::Evaluate(grpc::CallbackServerContext* ctx,
                                                   const v1::EvaluateRequest* req,
                                                   v1::EvaluateResponse* resp) {
  auto call = std::make_shared<Call>(this, ctx, Rpc::kEvaluate);
  grpc::ServerUnaryReactor* reactor = call->reactor();
  if (call->FinishIfRefused()) return reactor;
  const int64_t limit = registry_->limits().max_batch_elements;
  auto input = std::make_shared<DecodedTensor>();
  auto targets = std::make_shared<DecodedTargets>();
  Status s = req->has_input() ? DecodeTensor(req->input(), "input", limit, input.get())
                              : InvalidArgument("input is required");
  if (s.ok()) {
    s = DecodeTargets(req->labels(), req->has_target() ? &req->target() : nullptr, limit,
                      targets.get());
  }
  if (!s.ok()) {
    call->Finish(s);
    return reactor;
  }
  // Evaluate reads the model in eval semantics whatever its mode: shared access.
  RunOnModel(call, req->model(), Want::kShared, BatchOf(*input),
             [this, req, resp, input, targets](ModelEntry& e, Access) {
    NORMD_RETURN_IF_ERROR(CheckBatch(e, input->view()));
    std::unique_ptr<ForwardRecord> rec = e.AcquireRecord();
    EvalResult r;
    Status st = dp_ != nullptr ? dp_->Evaluate(e, *req, *input, *targets, rec.get(), &r)
                               : e.model().Evaluate(input->view(), targets->targets, rec.get(), &r);
    if (st.ok()) {
      if (ModelMetrics* m = e.metrics()) {
        m->AddSamples(SampleOp::kEvaluate, r.samples);
        m->RecordDrift(*rec, /*training=*/false);
      }
      resp->set_loss(r.loss);
      resp->set_accuracy(r.accuracy);
      resp->set_samples(r.samples);
    }
    e.ReleaseRecord(std::move(rec));
    return st;
  });
  return reactor;
}

// --- State -------------------------------------------------------------------------------------

grpc::ServerUnaryReactor* TrainerService::GetState(grpc::CallbackServerContext* ctx,
                                                   const v1::GetStateRequest* req,
                                                   v1::ModelState* resp) {
  auto call = std::make_shared<Call>(this, ctx, Rpc::kGetState);
  grpc::ServerUnaryReactor* reactor = call->reactor();
  if (call->FinishIfRefused()) return reactor;
  RunOnModel(call, req->model(), Want::kShared, [req, resp](ModelEntry& e, Access) {
    StateToWire(e.model().GetState(req->include_optimizer()), resp);
    return Status::Ok();
  });
  return reactor;
}

grpc::ServerUnaryReactor* TrainerService::SetState(grpc::CallbackServerContext* ctx,
                                                   const v1::SetStateRequest* req,
                                                   v1::Model* resp) {
  auto call = std::make_shared<Call>(this, ctx, Rpc::kSetState);
  grpc::ServerUnaryReactor* reactor = call->reactor();
  if (call->FinishIfRefused()) return reactor;
  auto entries = std::make_shared<std::vector<NamedTensor>>();
  Status s = StateFromWire(req->state(), registry_->limits().max_batch_elements, entries.get());
  if (!s.ok()) {
    call->Finish(s);
    return reactor;
  }
  RunOnModel(call, req->model(), Want::kExclusive,
             [this, req, resp, entries](ModelEntry& e, Access) {
    NORMD_RETURN_IF_ERROR(e.model().SetState(*entries, req->strict()));
    if (dp_ != nullptr) dp_->Replicate(e, DataParallelJob::Control::kSetState, *req);
    e.ReleaseAllRetained("released by SetState (the state it ran against was replaced)");
    RecordMutation(e, Mutation::kState);
    e.Publish();
    e.ToWire(resp);
    spdlog::info("event=state_set model={} entries={} strict={} step={}", e.name(),
                 entries->size(), req->strict(), e.model().step());
    return Status::Ok();
  });
  return reactor;
}

grpc::ServerUnaryReactor* TrainerService::ResetRunningStats(
    grpc::CallbackServerContext* ctx, const v1::ResetRunningStatsRequest* req, v1::Model* resp) {
  auto call = std::make_shared<Call>(this, ctx, Rpc::kResetRunningStats);
  grpc::ServerUnaryReactor* reactor = call->reactor();
  if (call->FinishIfRefused()) return reactor;
  RunOnModel(call, req->model(), Want::kExclusive, [this, req, resp](ModelEntry& e, Access) {
    e.model().ResetRunningStats();
    if (dp_ != nullptr) dp_->Replicate(e, DataParallelJob::Control::kResetRunningStats, *req);
    e.ReleaseAllRetained("released by ResetRunningStats (the statistics it used were reset)");
    RecordMutation(e, Mutation::kReset);
    e.Publish();
    e.ToWire(resp);
    spdlog::info("event=running_stats_reset model={} step={}", e.name(), e.model().step());
    return Status::Ok();
  });
  return reactor;
}

grpc::ServerUnaryReactor* TrainerService::UpdateOptimizer(grpc::CallbackServerContext* ctx,
                                                          const v1::UpdateOptimizerRequest* req,
                                                          v1::Model* resp) {
  auto call = std::make_shared<Call>(this, ctx, Rpc::kUpdateOptimizer);
  grpc::ServerUnaryReactor* reactor = call->reactor();
  if (call->FinishIfRefused()) return reactor;
  auto config = std::make_shared<OptimizerConfig>();
  Status s = req->has_optimizer()
                 ? OptimizerSpecToConfig(req->optimizer(), "optimizer", config.get())
                 : InvalidArgument("optimizer must be set (sgd or adam)");
  if (!s.ok()) {
    call->Finish(s);
    return reactor;
  }
  RunOnModel(call, req->model(), Want::kExclusive,
             [this, req, resp, config](ModelEntry& e, Access) {
    NORMD_RETURN_IF_ERROR(e.model().UpdateOptimizer(*config));
    if (dp_ != nullptr) dp_->Replicate(e, DataParallelJob::Control::kUpdateOptimizer, *req);
    e.SetOptimizerSpec(req->optimizer());
    RecordMutation(e, Mutation::kOptimizer);
    e.Publish();
    e.ToWire(resp);
    spdlog::info("event=optimizer_updated model={} optimizer=\"{}\" step={}", e.name(),
                 req->optimizer().ShortDebugString(), e.model().step());
    return Status::Ok();
  });
  return reactor;
}

grpc::ServerUnaryReactor* TrainerService::SaveModel(grpc::CallbackServerContext* ctx,
                                                    const v1::SaveModelRequest* req,
                                                    v1::SaveModelResponse* resp) {
  auto call = std::make_shared<Call>(this, ctx, Rpc::kSaveModel);
  grpc::ServerUnaryReactor* reactor = call->reactor();
  if (call->FinishIfRefused()) return reactor;
  std::shared_ptr<ModelEntry> entry;
  Status s = registry_->Find(call->who(), req->model(), &entry);
  if (s.ok() && registry_->persistence() == nullptr) {
    s = FailedPrecondition("persistence not configured: this server keeps models in memory only");
  }
  if (!s.ok()) {
    call->Finish(s);
    return reactor;
  }
  RunOnModel(call, req->model(), Want::kShared, [this, resp](ModelEntry& e, Access) {
    uint64_t step = 0;
    NORMD_RETURN_IF_ERROR(registry_->persistence()->Save(e, &step));
    resp->set_step(step);
    return Status::Ok();
  });
  return reactor;
}

// --- Layer options and folding -----------------------------------------------------------------

grpc::ServerUnaryReactor* TrainerService::SetLayerOptions(grpc::CallbackServerContext* ctx,
                                                          const v1::SetLayerOptionsRequest* req,
                                                          v1::Model* resp) {
  auto call = std::make_shared<Call>(this, ctx, Rpc::kSetLayerOptions);
  grpc::ServerUnaryReactor* reactor = call->reactor();
  if (call->FinishIfRefused()) return reactor;
  auto changes = std::make_shared<std::vector<LayerOptionsChange>>();
  LayerOptionsFromWire(req->layers(), changes.get());
  RunOnModel(call, req->model(), Want::kExclusive,
             [this, req, resp, changes](ModelEntry& e, Access) {
    bool frozen_changed = false;
    NORMD_RETURN_IF_ERROR(e.model().SetLayerOptions(*changes, &frozen_changed));
    if (dp_ != nullptr) dp_->Replicate(e, DataParallelJob::Control::kSetLayerOptions, *req);
    if (frozen_changed) {
      e.ReleaseAllRetained("released by SetLayerOptions (a layer was frozen or unfrozen)");
    }
    RecordMutation(e, Mutation::kLayerOptions);
    e.Publish();
    e.ToWire(resp);
    std::string summary;
    for (const LayerOptionsStatus& o : e.model().layer_options()) {
      if (!o.frozen && o.trainable) continue;
      summary += StrCat(summary.empty() ? "" : ",", o.name, o.frozen ? ":frozen" : "",
                        o.trainable ? "" : ":untrainable");
    }
    spdlog::info("event=layer_options_set model={} changes={} non_default=\"{}\" step={}", e.name(),
                 changes->size(), summary, e.model().step());
    return Status::Ok();
  });
  return reactor;
}

grpc::ServerUnaryReactor* TrainerService::FoldBatchNorm(grpc::CallbackServerContext* ctx,
                                                        const v1::FoldBatchNormRequest* req,
                                                        v1::FoldBatchNormResponse* resp) {
  auto call = std::make_shared<Call>(this, ctx, Rpc::kFoldBatchNorm);
  grpc::ServerUnaryReactor* reactor = call->reactor();
  if (call->FinishIfRefused()) return reactor;
  if (!req->new_model().empty() && req->new_model().find('/') == std::string::npos) {
    Status s = ValidateModelId(req->new_model(), "new_model");
    if (!s.ok()) {
      call->Finish(s);
      return reactor;
    }
  }
  // Folding reads the model: shared access. The copy is created from the folded result while
  // the source is still held, so it is the source's state at one moment.
  RunOnModel(call, req->model(), Want::kShared, [this, call, req, resp](ModelEntry& e, Access) {
    normd::FoldedModel folded;
    normd::FoldBatchNorm(e.model(), &folded);
    FoldedSpecToWire(e.spec(), folded, resp->mutable_spec());
    StateToWire(folded.state, resp->mutable_state());
    const int removed = normd::NumFoldedBatchNorms(folded.layers);
    if (req->new_model().empty()) return Status::Ok();
    std::shared_ptr<ModelEntry> copy;
    NORMD_RETURN_IF_ERROR(registry_->Create(
        call->who(), req->new_model(), resp->spec(), &copy, [&folded](Model& m) {
          NORMD_RETURN_IF_ERROR(m.SetState(folded.state, /*strict=*/true));
          m.SetMode(/*training=*/false, /*freeze_running_stats=*/false);
          m.set_inference_only();
          return Status::Ok();
        }));
    copy->ToWire(resp->mutable_model());
    spdlog::info("event=model_folded model={} new_model={} folded_batch_norms={} layers={} "
                 "models={}",
                 e.name(), copy->name(), removed, folded.config.layers.size(), registry_->size());
    return Status::Ok();
  });
  return reactor;
}

grpc::ServerUnaryReactor* TrainerService::CheckReplicas(grpc::CallbackServerContext* ctx,
                                                        const v1::CheckReplicasRequest* /*req*/,
                                                        v1::CheckReplicasResponse* resp) {
  auto call = std::make_shared<Call>(this, ctx, Rpc::kCheckReplicas);
  grpc::ServerUnaryReactor* reactor = call->reactor();
  if (call->FinishIfRefused()) return reactor;
  if (!call->who().admin) {
    call->Finish(Status(StatusCode::kPermissionDenied,
                        "CheckReplicas reads every tenant's models: admins only"));
    return reactor;
  }
  // Waits for each model's running work (it takes every model's lock): pool work.
  pool_->Submit(call->who().tenant, [this, call, resp] {
    Status s;
    if (dp_ != nullptr) {
      s = dp_->CheckReplicas(registry_, resp);
    } else {
      std::vector<std::shared_lock<std::shared_mutex>> locks;
      int models = 0;
      resp->add_digests(DigestRegistry(registry_, &models, &locks));
      resp->set_world_size(1);
      resp->set_models(models);
      resp->set_consistent(true);
    }
    call->Finish(s);
  });
  return reactor;
}

grpc::ServerReadReactor<v1::AdaptStatisticsRequest>* TrainerService::AdaptStatistics(
    grpc::CallbackServerContext* ctx, v1::Model* resp) {
  return new AdaptStatisticsReactor(this, ctx, resp);
}

}  // namespace normd::server
