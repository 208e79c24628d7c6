// Fuzz target: request sequences on a tiny model, through the code the service runs.
//
// Two model slots hold 4 -> Linear(8) -> BatchNorm1d(8) -> ReLU [-> Dropout] -> Linear(3)
// models (cross-entropy or MSE, SGD or Adam); the input is a program of up to 64 operations on
// them (format: sequence_fuzz.h): create, delete, set mode, forward (with or without retaining
// it), backward of a retained forward (fresh, stale, consumed, unknown ids), apply gradients,
// train step, evaluate, get/set state, reset running statistics, update the optimizer.
//
// Each operation goes the way TrainerService (server/service.cc) takes it, minus gRPC: wire
// messages decoded by server/convert.h, the model found in a server::Registry, the work run
// inline (small eval Forwards and Evaluates while the model is free) or queued on the model's
// ModelEntry and run on a ComputePool, holding the model's lock the way it was granted, then the
// same calls on the entry and the core Model as the handler makes.
// The gRPC reactor and metrics glue of the handlers is exercised by the service tests instead.
//
// After every operation the harness checks what a client relies on (abort on violation):
//  - the status code is the one the request deserves (an independent model of the rules:
//    NOT_FOUND, ALREADY_EXISTS, INVALID_ARGUMENT, FAILED_PRECONDITION for stale or unknown
//    forward ids and steps without gradients, RESOURCE_EXHAUSTED past the retained limit);
//  - a failed operation leaves the state (parameters, buffers, optimizer state), the step, the
//    mode and the frozen flag bit-identical;
//  - the step counter only moves, by one, on a successful TrainStep or ApplyGradients;
//  - eval-mode work, Evaluate, GetState, Backward and UpdateOptimizer change no state; a
//    train-mode forward changes only the BatchNorm buffers (none when frozen); ResetRunningStats
//    resets exactly them; SetState writes exactly what it was given;
//  - the published summary (GetModel) agrees with the model;
//  - while every input, learning rate and state value stayed moderate, nothing non-finite
//    appears (outputs, losses, state), and eval-mode Forward equals Predict bit for bit.
#include "tests/fuzz/sequence_fuzz.h"

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <future>
#include <map>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <vector>

#include "core/model.h"
#include "normd/v1/normd.pb.h"
#include "server/compute_pool.h"
#include "server/convert.h"
#include "server/metrics.h"
#include "server/registry.h"
#include "tests/fuzz/fuzz_util.h"

namespace normd::fuzz {
namespace {

using server::ModelEntry;
using Access = ModelEntry::Access;
using Want = ModelEntry::Want;

constexpr int kMaxRetained = 3;
// TrainerService runs eval Forwards and Evaluates up to this many multiply-adds inline
// (kInlineMaxCost in server/service.cc).
constexpr int64_t kInlineMaxCost = int64_t{1} << 16;
const char* const kIds[2] = {"a", "b"};

server::RegistryLimits Limits() {
  server::RegistryLimits l;
  l.max_models = 2;
  l.max_parameters = 4096;
  l.max_batch_elements = 4096;
  l.max_layers = 8;
  l.max_retained_forwards = kMaxRetained;
  l.retained_forward_timeout = std::chrono::hours(1);  // no expiry: runs are deterministic
  l.max_queued_per_model = 4;
  return l;
}

v1::ModelSpec MakeSpec(uint8_t config) {
  v1::ModelSpec spec;
  spec.add_input_shape(kSequenceFeatures);
  v1::LinearSpec* l0 = spec.add_layers()->mutable_linear();
  l0->set_in_features(kSequenceFeatures);
  l0->set_out_features(8);
  v1::LayerSpec* bn = spec.add_layers();
  bn->set_name("bn");
  bn->mutable_batch_norm1d()->set_num_features(8);
  spec.add_layers()->mutable_relu();
  if (config & kSequenceDropout) spec.add_layers()->mutable_dropout()->set_p(0.25f);
  v1::LinearSpec* l1 = spec.add_layers()->mutable_linear();
  l1->set_in_features(8);
  l1->set_out_features(kSequenceOutputs);
  spec.set_loss((config & kSequenceMse) ? v1::LOSS_MSE : v1::LOSS_CROSS_ENTROPY);
  if (config & kSequenceAdam) {
    spec.mutable_optimizer()->mutable_adam()->set_lr(0.01f);
  } else {
    spec.mutable_optimizer()->mutable_sgd()->set_lr(0.05f);
    spec.mutable_optimizer()->mutable_sgd()->set_momentum(0.9f);
  }
  spec.set_seed(config);
  return spec;
}

bool IsBuffer(const std::string& name) {
  return name.find("running_") != std::string::npos ||
         name.find("num_batches_tracked") != std::string::npos;
}

bool AllStateFinite(const std::vector<NamedTensor>& state) {
  for (const NamedTensor& t : state) {
    if (!AllFinite(t.values.data(), static_cast<int64_t>(t.values.size()))) return false;
  }
  return true;
}

// Everything a failed request must leave untouched.
struct Snapshot {
  std::vector<NamedTensor> state;
  uint64_t step = 0;
  bool training = true;
  bool frozen = false;
};

Snapshot Take(Model& model) {
  return Snapshot{model.GetState(true), model.step(), model.training(),
                  model.running_stats_frozen()};
}

// A retained forward as the harness expects the entry to hold it.
struct Tracked {
  uint64_t params_version = 0;
  uint64_t mode_version = 0;
  Shape output_shape;
};

struct Slot {
  bool exists = false;
  std::map<uint64_t, Tracked> retained;
  uint64_t newest_id = 0;
  int64_t pending_backwards = 0;
  bool has_saved = false;
  v1::ModelState saved;
};

// A batch the program asked for, as a wire tensor plus what the rules make of it.
struct Batch {
  v1::Tensor wire;
  int64_t rows = 0;
  bool five_features = false;
  bool non_finite = false;
  bool huge = false;
};

Batch ReadBatch(ByteReader& in, bool raw) {
  Batch b;
  const uint8_t d = in.Byte();
  b.rows = (d & 7) % 7;
  const int mode = (d >> 3) & 7;
  b.five_features = (d & 0x40) != 0;
  const int cols = b.five_features ? 5 : kSequenceFeatures;
  std::vector<float> v(static_cast<size_t>(b.rows * cols));
  for (float& x : v) x = static_cast<float>(static_cast<int8_t>(in.Byte())) / 32.0f;
  if (!v.empty()) {
    if (mode == 5) v[v.size() / 2] = std::numeric_limits<float>::quiet_NaN();
    if (mode == 6) v[v.size() / 2] = std::numeric_limits<float>::infinity();
    if (mode == 7) v[v.size() / 2] = 1e30f;
  }
  b.non_finite = !v.empty() && (mode == 5 || mode == 6);
  b.huge = !v.empty() && mode == 7;
  server::EncodeTensor(v.data(), Shape{b.rows, cols}, raw, &b.wire);
  return b;
}

class Harness {
 public:
  explicit Harness(uint8_t config)
      : config_(config), spec_(MakeSpec(config)), registry_(Limits(), Metrics(), Pool()) {}

  // Deletes what is left the way DeleteModel does (a model's metric series go with it; the
  // metrics are process-wide, as in the server) and waits until the pool has finished every
  // task of this input, so no entry of this input outlives it.
  ~Harness() {
    for (int slot = 0; slot < 2; ++slot) {
      if (slots_[slot].exists) Delete(slot);
    }
    entry_.reset();
    std::promise<void> idle;
    Pool()->Submit(server::kDefaultTenant, [&idle] { idle.set_value(); });
    idle.get_future().wait();
  }

  // Creates the process-wide pieces before the first input, so they count as start-up.
  static void Init() {
    Metrics();
    Pool();
  }

  void Run(ByteReader& in) {
    for (int i = 0; i < kMaxSequenceOps && !in.empty(); ++i) {
      const uint8_t b = in.Byte();
      const int slot = b >> 7;
      const auto op = static_cast<SequenceOp>((b & 0x7f) % kNumOps);
      Step(op, slot, in);
    }
  }

 private:
  static server::Metrics* Metrics() {
    static server::Metrics* metrics = new server::Metrics("fuzz");
    return metrics;
  }
  // One pool thread, reused by every input; each operation waits for its task.
  static server::ComputePool* Pool() {
    static server::ComputePool* pool = new server::ComputePool(1, 1);
    return pool;
  }

  // RunOnModel of the service: find, then run on the calling thread when the service would
  // (an eval Forward or Evaluate of at most kInlineMaxCost multiply-adds, `inline_batch` > 0,
  // while the model is free), else queue with `want`; run holding the lock as granted.
  Status RunOnModel(int slot, Want want, const std::function<Status(ModelEntry&, Access)>& body,
                    int64_t inline_batch = 0) {
    std::shared_ptr<ModelEntry> entry;
    NORMD_RETURN_IF_ERROR(registry_.Find(server::Principal(), kIds[slot], &entry));
    std::promise<Status> done;
    const std::function<void(Access)> task = [&](Access access) {
      Status st;
      if (access == Access::kExclusive) {
        std::unique_lock<std::shared_mutex> lock(entry->mu());
        st = entry->deleted() ? NotFound("deleted") : body(*entry, access);
      } else {
        std::shared_lock<std::shared_mutex> lock(entry->mu());
        st = entry->deleted() ? NotFound("deleted") : body(*entry, access);
      }
      done.set_value(st);
    };
    if (inline_batch > 0 &&
        SaturatingMul(inline_batch, entry->forward_cost_per_sample()) <= kInlineMaxCost &&
        entry->TryRunInline(entry, want, task)) {
      return done.get_future().get();
    }
    const Status queued = entry->Schedule(entry, want, task);
    if (!queued.ok()) return queued;
    return done.get_future().get();
  }

  Model* ModelOf(int slot) {
    std::shared_ptr<ModelEntry> entry;
    if (!registry_.Find(server::Principal(), kIds[slot], &entry).ok()) return nullptr;
    entry_ = entry;  // keeps the model alive while the harness reads it
    return &entry->model();
  }

  void Expect(const Status& s, StatusCode want, SequenceOp op) {
    NORMD_FUZZ_CHECK(s.code() == want, "op %d on '%s': %s (%s), expected %s", op, kIds[current_],
                     CodeName(s.code()), s.message().c_str(), CodeName(want));
    NORMD_FUZZ_CHECK(s.ok() || !s.message().empty(), "op %d: an error without a message", op);
  }

  void Step(SequenceOp op, int slot, ByteReader& in) {
    current_ = slot;
    Slot& sl = slots_[slot];
    Model* model = ModelOf(slot);
    NORMD_FUZZ_CHECK((model != nullptr) == sl.exists, "slot %d exists=%d in the registry=%d", slot,
                     sl.exists, model != nullptr);
    Snapshot before;
    if (model != nullptr) before = Take(*model);
    Status s;
    switch (op) {
      case kCreate:
        s = Create(slot);
        break;
      case kDelete:
        s = Delete(slot);
        break;
      case kSetMode:
        s = SetMode(slot, in, before);
        break;
      case kForward:
        s = Forward(slot, in, before);
        break;
      case kBackward:
        s = Backward(slot, in);
        break;
      case kApplyGradients:
        s = ApplyGradients(slot, before);
        break;
      case kTrainStep:
        s = TrainOrEvaluate(slot, in, before, /*train=*/true);
        break;
      case kEvaluate:
        s = TrainOrEvaluate(slot, in, before, /*train=*/false);
        break;
      case kGetState:
        s = GetState(slot, in);
        break;
      case kSetState:
        s = SetState(slot, in, before);
        break;
      case kResetRunningStats:
        s = ResetRunningStats(slot);
        break;
      case kUpdateOptimizer:
        s = UpdateOptimizer(slot, in);
        break;
      case kNumOps:
        break;
    }
    model = ModelOf(slot);
    if (model == nullptr || before.state.empty()) return;  // created or deleted just now
    const Snapshot after = Take(*model);
    if (!s.ok()) {
      NORMD_FUZZ_CHECK(SameState(before.state, after.state), "op %d failed (%s) but changed %s", op,
                       s.message().c_str(), FirstDifference(before.state, after.state).c_str());
      NORMD_FUZZ_CHECK(before.step == after.step && before.training == after.training &&
                           before.frozen == after.frozen,
                       "op %d failed but changed the step, mode or frozen flag", op);
    }
    const bool stepped = s.ok() && (op == kTrainStep || op == kApplyGradients);
    NORMD_FUZZ_CHECK(after.step == before.step + (stepped ? 1 : 0), "op %d: step %llu -> %llu", op,
                     static_cast<unsigned long long>(before.step),
                     static_cast<unsigned long long>(after.step));
    if (!tainted_) {
      NORMD_FUZZ_CHECK(AllStateFinite(after.state), "op %d left a non-finite state value in %s", op,
                       FirstDifference(before.state, after.state).c_str());
    }
    CheckSummary(slot, after);
  }

  // GetModel's view (published summary) agrees with the model.
  void CheckSummary(int slot, const Snapshot& now) {
    v1::Model wire;
    entry_->ToWire(&wire);
    NORMD_FUZZ_CHECK(wire.id() == kIds[slot], "summary id");
    NORMD_FUZZ_CHECK(wire.step() == now.step, "summary step %llu, model step %llu",
                     static_cast<unsigned long long>(wire.step()),
                     static_cast<unsigned long long>(now.step));
    NORMD_FUZZ_CHECK((wire.mode() == v1::MODE_TRAIN) == now.training &&
                         wire.running_stats_frozen() == now.frozen,
                     "summary mode or frozen flag");
    for (const NamedTensor& t : now.state) {
      if (t.name != "1.num_batches_tracked") continue;
      NORMD_FUZZ_CHECK(
          wire.batch_norms_size() == 1 &&
              static_cast<float>(wire.batch_norms(0).num_batches_tracked()) == t.values[0],
          "summary num_batches_tracked %llu, model %g",
          static_cast<unsigned long long>(wire.batch_norms(0).num_batches_tracked()), t.values[0]);
    }
  }

  Status Create(int slot) {
    std::shared_ptr<ModelEntry> entry;
    const Status s = registry_.Create(server::Principal(), kIds[slot], spec_, &entry);
    Expect(s, slots_[slot].exists ? StatusCode::kAlreadyExists : StatusCode::kOk, kCreate);
    if (s.ok()) {
      Slot& sl = slots_[slot];
      sl.exists = true;
      sl.retained.clear();
      sl.newest_id = 0;
      sl.pending_backwards = 0;
    }
    return s;
  }

  Status Delete(int slot) {
    const Status s = RunOnModel(slot, Want::kExclusive,
                                [this](ModelEntry& e, Access) { return registry_.Remove(e); });
    Expect(s, slots_[slot].exists ? StatusCode::kOk : StatusCode::kNotFound, kDelete);
    if (s.ok()) {
      slots_[slot].exists = false;
      slots_[slot].retained.clear();
      slots_[slot].pending_backwards = 0;
    }
    return s;
  }

  Status SetMode(int slot, ByteReader& in, const Snapshot& before) {
    const uint8_t a = in.Byte();
    v1::SetModeRequest req;
    req.set_model(kIds[slot]);
    req.set_mode((a & 1) ? v1::MODE_TRAIN : v1::MODE_EVAL);
    if (a & 2) req.set_freeze_running_stats((a & 4) != 0);
    const Status s = RunOnModel(slot, Want::kExclusive, [&req](ModelEntry& e, Access) {
      Model& model = e.model();
      const bool freeze = req.has_freeze_running_stats() ? req.freeze_running_stats()
                                                         : model.running_stats_frozen();
      model.SetMode(req.mode() == v1::MODE_TRAIN, freeze);
      ++e.mutations;
      e.Publish();
      return Status::Ok();
    });
    Expect(s, slots_[slot].exists ? StatusCode::kOk : StatusCode::kNotFound, kSetMode);
    if (s.ok()) {
      Model& m = *ModelOf(slot);
      NORMD_FUZZ_CHECK(m.training() == ((a & 1) != 0), "SetMode: mode not set");
      NORMD_FUZZ_CHECK(m.running_stats_frozen() == ((a & 2) ? (a & 4) != 0 : before.frozen),
                       "SetMode: frozen flag");
      NORMD_FUZZ_CHECK(SameState(before.state, m.GetState(true)), "SetMode changed the state");
    }
    return s;
  }

  Status Forward(int slot, ByteReader& in, const Snapshot& before) {
    Slot& sl = slots_[slot];
    Batch batch = ReadBatch(in, /*raw=*/false);
    const uint8_t flags = in.Byte();
    const bool retain = flags & 1;
    if (flags & 2) {  // the same values in the raw encoding
      std::vector<float> v(batch.wire.values().begin(), batch.wire.values().end());
      server::EncodeTensor(v.data(), Shape{batch.wire.shape(0), batch.wire.shape(1)}, true,
                           &batch.wire);
    }
    server::DecodedTensor input;
    Status s = server::DecodeTensor(batch.wire, "input", Limits().max_batch_elements, &input);
    NORMD_FUZZ_CHECK(s.ok(), "a well-formed input tensor was refused: %s", s.message().c_str());

    v1::ForwardResponse resp;
    bool out_finite = true, predict_equal = true;
    uint64_t params_version = 0, mode_version = 0;
    s = RunOnModel(
        slot, Want::kByMode,
        [&](ModelEntry& e, Access access) -> Status {
          Model& model = e.model();
          const bool training = model.training();
          if (training && access != Access::kExclusive) {
            return Status(StatusCode::kInternal, "train-mode forward scheduled as shared");
          }
          if (retain) NORMD_RETURN_IF_ERROR(e.ReserveRetained());
          std::unique_ptr<ForwardRecord> rec = e.AcquireRecord();
          Status st = model.Forward(input.view(), rec.get());
          if (!st.ok()) {
            if (retain) e.CancelReservation();
            e.ReleaseRecord(std::move(rec));
            return st;
          }
          const Tensor& out = rec->output();
          server::EncodeTensor(out.data(), out.shape(), input.raw(), resp.mutable_output());
          out_finite = out.AllFinite();
          if (flags & 4) {
            server::LayerStatsToWire(model.net(), model.net().ActivationStats(*rec),
                                     resp.mutable_layer_stats());
          }
          if (!training) {
            ForwardRecord p;
            predict_equal = model.Predict(input.view(), &p).ok() &&
                            p.output().shape() == out.shape() &&
                            std::memcmp(p.output().data(), out.data(), out.size() * 4) == 0;
          }
          if (server::ModelMetrics* m = e.metrics()) {
            m->AddSamples(server::SampleOp::kForward, rec->batch_size());
            m->RecordDrift(*rec, training);
          }
          if (training) ++e.mutations;
          e.PublishForward(*rec);
          params_version = model.params_version();
          mode_version = model.mode_version();
          if (retain) {
            rec->RetainInput();
            resp.set_forward_id(e.CommitRetained(std::move(rec)));
          } else {
            e.ReleaseRecord(std::move(rec));
          }
          return Status::Ok();
        },
        batch.rows);

    StatusCode want = StatusCode::kOk;
    if (!sl.exists) {
      want = StatusCode::kNotFound;
    } else if (retain && static_cast<int>(sl.retained.size()) >= kMaxRetained) {
      want = StatusCode::kResourceExhausted;
    } else if (batch.rows == 0 || batch.five_features || batch.non_finite ||
               (before.training && batch.rows == 1)) {
      want = StatusCode::kInvalidArgument;
    }
    Expect(s, want, kForward);
    if (!s.ok()) return s;

    NORMD_FUZZ_CHECK(resp.output().shape_size() == 2 && resp.output().shape(0) == batch.rows &&
                         resp.output().shape(1) == kSequenceOutputs,
                     "Forward output shape");
    NORMD_FUZZ_CHECK(predict_equal, "eval-mode Forward and Predict differ");
    if (!tainted_ && !batch.huge) NORMD_FUZZ_CHECK(out_finite, "a finite input gave %s", "NaN/Inf");
    if (batch.huge) tainted_ = true;  // buffers, or a Backward of this forward, may overflow
    const Snapshot after = Take(*ModelOf(slot));
    for (size_t i = 0; i < after.state.size(); ++i) {
      const bool may_change = before.training && !before.frozen && IsBuffer(after.state[i].name);
      if (!may_change) {
        NORMD_FUZZ_CHECK(SameState({before.state[i]}, {after.state[i]}), "a %s Forward changed %s",
                         before.training ? "train-mode" : "eval-mode", after.state[i].name.c_str());
      }
    }
    if (retain) {
      const uint64_t id = resp.forward_id();
      NORMD_FUZZ_CHECK(id > sl.newest_id, "forward id %llu not fresh",
                       static_cast<unsigned long long>(id));
      sl.newest_id = id;
      sl.retained[id] = Tracked{params_version, mode_version, Shape{batch.rows, kSequenceOutputs}};
    }
    return s;
  }

  Status Backward(int slot, ByteReader& in) {
    Slot& sl = slots_[slot];
    const uint8_t which = in.Byte();
    uint64_t id = which;
    if (which == 0) id = 0;
    if (which == 1) id = sl.newest_id;
    if (which == 2) id = sl.retained.empty() ? sl.newest_id : sl.retained.begin()->first;
    if (which == 3) id = sl.newest_id + 1;
    const uint8_t g = in.Byte();
    const int variant = g & 3;
    const bool return_grad_input = (g & 4) != 0;

    auto tracked = sl.retained.find(id);
    const bool known = sl.exists && id != 0 && tracked != sl.retained.end();
    Shape shape = known ? tracked->second.output_shape : Shape{2, kSequenceOutputs};
    if (variant == 1) shape[0] += 1;
    std::vector<float> values = PseudoRandom(static_cast<size_t>(shape.NumElements()), g + id);
    if (variant == 2 && !values.empty()) values[0] = std::numeric_limits<float>::quiet_NaN();
    v1::BackwardRequest req;
    req.set_model(kIds[slot]);
    req.set_forward_id(id);
    req.set_return_grad_input(return_grad_input);
    server::EncodeTensor(values.data(), shape, false, req.mutable_grad_output());
    server::DecodedTensor grad;
    Status s =
        server::DecodeTensor(req.grad_output(), "grad_output", Limits().max_batch_elements, &grad);
    NORMD_FUZZ_CHECK(s.ok(), "a well-formed grad_output was refused: %s", s.message().c_str());

    v1::BackwardResponse resp;
    s = RunOnModel(slot, Want::kExclusive, [&](ModelEntry& e, Access) -> Status {
      std::unique_ptr<ForwardRecord> rec;
      NORMD_RETURN_IF_ERROR(e.TakeRetained(id, &rec));
      Tensor grad_input;
      Status st =
          e.model().Backward(rec.get(), grad.view(), return_grad_input ? &grad_input : nullptr);
      if (!st.ok()) {
        if (st.code() == StatusCode::kFailedPrecondition) {
          e.NoteReleased(id, st.message());
          e.ReleaseRecord(std::move(rec));
        } else {
          e.PutBackRetained(id, std::move(rec));
        }
        return st;
      }
      e.NoteReleased(id, "released by its Backward");
      if (return_grad_input) {
        server::EncodeTensor(grad_input.data(), grad_input.shape(), grad.raw(),
                             resp.mutable_grad_input());
      }
      ++e.pending_backwards;
      e.ReleaseRecord(std::move(rec));
      return Status::Ok();
    });

    StatusCode want = StatusCode::kOk;
    bool consumed = false;
    if (!sl.exists) {
      want = StatusCode::kNotFound;
    } else if (!known) {
      want = StatusCode::kFailedPrecondition;
    } else {
      Model& model = *ModelOf(slot);
      const bool stale = tracked->second.params_version != model.params_version() ||
                         tracked->second.mode_version != model.mode_version();
      if (stale) {
        want = StatusCode::kFailedPrecondition;
        consumed = true;
      } else if (variant == 1 || variant == 2) {
        want = StatusCode::kInvalidArgument;  // the forward stays retained for a retry
      } else {
        consumed = true;
      }
    }
    Expect(s, want, kBackward);
    if (consumed) sl.retained.erase(id);
    if (s.ok()) {
      ++sl.pending_backwards;
      if (return_grad_input) {
        NORMD_FUZZ_CHECK(resp.grad_input().shape_size() == 2 &&
                             resp.grad_input().shape(0) == shape[0] &&
                             resp.grad_input().shape(1) == kSequenceFeatures,
                         "grad_input shape");
      }
    }
    return s;
  }

  Status ApplyGradients(int slot, const Snapshot& before) {
    uint64_t step = 0;
    const Status s = RunOnModel(slot, Want::kExclusive, [&step](ModelEntry& e, Access) {
      if (e.pending_backwards == 0) return FailedPrecondition("no accumulated gradients");
      StepResult applied;
      Status st = e.model().ApplyGradients(&applied);
      step = applied.step;
      e.pending_backwards = 0;
      if (!st.ok()) {
        if (server::ModelMetrics* m = e.metrics()) m->RecordNonFiniteStep();
        return st;
      }
      if (server::ModelMetrics* m = e.metrics()) m->RecordStep(nullptr, applied.grad_norm);
      ++e.mutations;
      e.Publish();
      return Status::Ok();
    });
    Slot& sl = slots_[slot];
    if (!sl.exists) {
      Expect(s, StatusCode::kNotFound, kApplyGradients);
    } else if (sl.pending_backwards == 0 ||
               (tainted_ && s.code() == StatusCode::kFailedPrecondition)) {
      // Refused without gradients; after extreme values a non-finite gradient may be refused.
      Expect(s, StatusCode::kFailedPrecondition, kApplyGradients);
    } else {
      Expect(s, StatusCode::kOk, kApplyGradients);
    }
    if (sl.exists) sl.pending_backwards = 0;
    if (s.ok()) {
      NORMD_FUZZ_CHECK(step == before.step + 1, "ApplyGradients reported step %llu",
                       static_cast<unsigned long long>(step));
    }
    return s;
  }

  Status TrainOrEvaluate(int slot, ByteReader& in, const Snapshot& before, bool train) {
    Slot& sl = slots_[slot];
    const Batch batch = ReadBatch(in, /*raw=*/false);
    const uint8_t t = in.Byte();
    const int variant = t & 3;
    const bool both = (t & 4) != 0;
    const bool mse = (config_ & kSequenceMse) != 0;
    const int64_t rows = batch.rows - (variant == 2 ? 1 : 0);
    std::vector<int64_t> labels;
    std::vector<float> target;
    for (int64_t i = 0; i < (rows < 0 ? 0 : rows); ++i) {
      labels.push_back((i * 5 + t) % kSequenceOutputs);
      for (int j = 0; j < kSequenceOutputs; ++j) target.push_back((i + j) % 2 ? 0.5f : -0.25f);
    }
    if (variant == 1 && !labels.empty()) labels[0] = kSequenceOutputs;
    Shape target_shape{rows < 0 ? 0 : rows, kSequenceOutputs + (variant == 1 ? 1 : 0)};
    target.resize(static_cast<size_t>(target_shape.NumElements()), 0.5f);

    v1::TrainStepRequest req;  // EvaluateRequest has the same fields
    req.set_model(kIds[slot]);
    *req.mutable_input() = batch.wire;
    if (!mse || both) {
      for (int64_t l : labels) req.add_labels(l);
    }
    if (mse || both) {
      server::EncodeTensor(target.data(), target_shape, false, req.mutable_target());
    }

    // Decoding happens on the request thread, before the model's queue.
    std::shared_ptr<ModelEntry> found;
    Status s = registry_.Find(server::Principal(), kIds[slot], &found);
    server::DecodedTensor input;
    server::DecodedTargets targets;
    if (s.ok()) {
      s = server::DecodeTensor(req.input(), "input", Limits().max_batch_elements, &input);
      if (s.ok()) {
        s = server::DecodeTargets(req.labels(), req.has_target() ? &req.target() : nullptr,
                                  Limits().max_batch_elements, &targets);
      }
    }
    double loss = 0;
    uint64_t step = 0;
    if (s.ok() && train) {
      s = RunOnModel(slot, Want::kExclusive, [&](ModelEntry& e, Access) -> Status {
        Model& model = e.model();
        TrainResult r;
        Status st = model.TrainStep(input.view(), targets.targets, &e.train_record, &r);
        if (!st.ok()) {
          if (st.code() == StatusCode::kFailedPrecondition) {
            e.pending_backwards = 0;
            if (server::ModelMetrics* m = e.metrics()) m->RecordNonFiniteStep();
          }
          return st;
        }
        e.pending_backwards = 0;
        if (server::ModelMetrics* m = e.metrics()) {
          m->AddSamples(server::SampleOp::kTrain, r.samples);
          m->RecordStep(&r.loss, r.grad_norm);
          m->RecordDrift(e.train_record, model.training());
        }
        ++e.mutations;
        e.PublishForward(e.train_record);
        loss = r.loss;
        step = r.step;
        return Status::Ok();
      });
    } else if (s.ok()) {
      s = RunOnModel(
          slot, Want::kShared,
          [&](ModelEntry& e, Access) -> Status {
            std::unique_ptr<ForwardRecord> rec = e.AcquireRecord();
            EvalResult r;
            Status st = e.model().Evaluate(input.view(), targets.targets, rec.get(), &r);
            if (st.ok()) {
              if (server::ModelMetrics* m = e.metrics()) {
                m->AddSamples(server::SampleOp::kEvaluate, r.samples);
                m->RecordDrift(*rec, /*training=*/false);
              }
              loss = r.loss;
            }
            e.ReleaseRecord(std::move(rec));
            return st;
          },
          batch.rows);
    }

    const bool targets_ok = !both && variant != 1 && variant != 2;
    StatusCode want = StatusCode::kOk;
    if (!sl.exists) {
      want = StatusCode::kNotFound;
    } else if (both || batch.rows == 0 || batch.five_features || batch.non_finite ||
               (train && before.training && batch.rows == 1) || !targets_ok) {
      want = StatusCode::kInvalidArgument;
    }
    const SequenceOp op = train ? kTrainStep : kEvaluate;
    if (want == StatusCode::kOk && train && (tainted_ || batch.huge) &&
        s.code() == StatusCode::kFailedPrecondition) {
      want = StatusCode::kFailedPrecondition;  // extreme values: a non-finite step is refused
    }
    Expect(s, want, op);
    if (train && sl.exists && (s.ok() || s.code() == StatusCode::kFailedPrecondition)) {
      sl.pending_backwards = 0;
    }
    if (s.ok()) {
      if (!tainted_ && !batch.huge) NORMD_FUZZ_CHECK(std::isfinite(loss), "a non-finite loss");
      if (train) {
        NORMD_FUZZ_CHECK(step == before.step + 1, "TrainStep reported step %llu",
                         static_cast<unsigned long long>(step));
        if (batch.huge) tainted_ = true;
      } else {
        NORMD_FUZZ_CHECK(SameState(before.state, ModelOf(slot)->GetState(true)),
                         "Evaluate changed the state");
      }
    }
    return s;
  }

  Status GetState(int slot, ByteReader& in) {
    const bool include_optimizer = in.Bool();
    v1::ModelState resp;
    const Status s = RunOnModel(slot, Want::kShared, [&](ModelEntry& e, Access) {
      server::StateToWire(e.model().GetState(include_optimizer), &resp);
      return Status::Ok();
    });
    Expect(s, slots_[slot].exists ? StatusCode::kOk : StatusCode::kNotFound, kGetState);
    if (s.ok()) {
      slots_[slot].saved = resp;
      slots_[slot].has_saved = true;
    }
    return s;
  }

  Status SetState(int slot, ByteReader& in, const Snapshot& before) {
    const uint8_t a = in.Byte();
    const int change = a & 7;
    const bool strict = (a & 8) != 0;
    const Slot& source = slots_[(a & 16) ? 1 - slot : slot];
    if (!source.has_saved) return Status::Ok();  // nothing to send
    v1::SetStateRequest req;
    req.set_model(kIds[slot]);
    req.set_strict(strict);
    *req.mutable_state() = source.saved;
    v1::ModelState& st = *req.mutable_state();
    bool must_fail = false;
    if (st.tensors_size() > 0) {
      v1::NamedTensor& first = *st.mutable_tensors(0);
      switch (change) {
        case 1:
          st.mutable_tensors()->erase(st.mutable_tensors()->begin());
          break;
        case 2:
          if (first.tensor().values_size() > 0) {
            first.mutable_tensor()->set_values(0, std::numeric_limits<float>::quiet_NaN());
            must_fail = true;
          }
          break;
        case 3:
          first.mutable_tensor()->add_shape(1);  // same element count, another shape
          must_fail = true;
          break;
        case 4:
          for (v1::NamedTensor& t : *st.mutable_tensors()) {
            if (t.tensor().shape_size() == 0) {
              t.mutable_tensor()->set_values(0, 0.5f);
              must_fail = true;
              break;
            }
          }
          break;
        case 5:
          first.set_name(first.name() + ".unknown");
          must_fail = true;
          break;
        case 6:
          *st.add_tensors() = first;
          must_fail = true;
          break;
        case 7:
          for (v1::NamedTensor& t : *st.mutable_tensors()) {
            if (t.tensor().shape_size() == 0) continue;  // counters stay integers
            for (int i = 0; i < t.tensor().values_size(); ++i) {
              t.mutable_tensor()->set_values(i, t.tensor().values(i) * 0.5f);
            }
          }
          break;
      }
    }
    std::vector<NamedTensor> entries;
    Status s = server::StateFromWire(req.state(), Limits().max_batch_elements, &entries);
    if (s.ok()) {
      s = RunOnModel(slot, Want::kExclusive, [&](ModelEntry& e, Access) -> Status {
        NORMD_RETURN_IF_ERROR(e.model().SetState(entries, req.strict()));
        e.ReleaseAllRetained("released by SetState");
        ++e.mutations;
        e.Publish();
        return Status::Ok();
      });
    } else {
      Fail("SetState: a state the harness encoded did not decode: %s", s.message().c_str());
    }
    Slot& sl = slots_[slot];
    if (!sl.exists) {
      Expect(s, StatusCode::kNotFound, kSetState);
      return s;
    }
    // Does every given entry exist in the model, once, with its shape?
    std::map<std::string, const NamedTensor*> have;
    for (const NamedTensor& t : before.state) have[t.name] = &t;
    bool fits = true;
    std::map<std::string, int> seen;
    for (const NamedTensor& t : entries) {
      auto it = have.find(t.name);
      fits &= it != have.end() && it->second->shape == t.shape && ++seen[t.name] == 1 &&
              AllFinite(t.values.data(), static_cast<int64_t>(t.values.size()));
    }
    if (strict) {
      for (const NamedTensor& t : before.state) {
        if (t.name.rfind("optimizer.", 0) != 0) fits &= seen.count(t.name) == 1;
      }
    }
    Expect(s, must_fail || !fits ? StatusCode::kInvalidArgument : StatusCode::kOk, kSetState);
    if (!s.ok()) return s;
    sl.retained.clear();
    const std::vector<NamedTensor> now = ModelOf(slot)->GetState(true);
    for (const NamedTensor& t : now) {
      const NamedTensor* given = nullptr;
      for (const NamedTensor& e : entries) {
        if (e.name == t.name) given = &e;
      }
      const NamedTensor* old = have[t.name];
      NORMD_FUZZ_CHECK(SameState({t}, {given != nullptr ? *given : *old}),
                       "SetState: entry %s is not what was %s", t.name.c_str(),
                       given != nullptr ? "given" : "there");
    }
    return s;
  }

  Status ResetRunningStats(int slot) {
    const Status s = RunOnModel(slot, Want::kExclusive, [](ModelEntry& e, Access) {
      e.model().ResetRunningStats();
      e.ReleaseAllRetained("released by ResetRunningStats");
      ++e.mutations;
      e.Publish();
      return Status::Ok();
    });
    Expect(s, slots_[slot].exists ? StatusCode::kOk : StatusCode::kNotFound, kResetRunningStats);
    if (!s.ok()) return s;
    slots_[slot].retained.clear();
    for (const NamedTensor& t : ModelOf(slot)->GetState(true)) {
      if (!IsBuffer(t.name)) continue;
      const float want = t.name.find("running_var") != std::string::npos ? 1.0f : 0.0f;
      for (float v : t.values) {
        NORMD_FUZZ_CHECK(v == want, "ResetRunningStats left %s = %g", t.name.c_str(), v);
      }
    }
    return s;
  }

  Status UpdateOptimizer(int slot, ByteReader& in) {
    const uint8_t a = in.Byte();
    const int kind = a & 3;
    const float lr = kLearningRates[(a >> 2) & 7];
    const bool adam_model = (config_ & kSequenceAdam) != 0;
    v1::UpdateOptimizerRequest req;
    req.set_model(kIds[slot]);
    const bool want_adam = kind == 0 ? adam_model : !adam_model;
    if (kind != 2) {
      if (want_adam) {
        req.mutable_optimizer()->mutable_adam()->set_lr(lr);
      } else {
        req.mutable_optimizer()->mutable_sgd()->set_lr(lr);
        if (a & 32) req.mutable_optimizer()->mutable_sgd()->set_momentum(0.9f);
      }
    }
    OptimizerConfig config;
    Status s = req.has_optimizer()
                   ? server::OptimizerSpecToConfig(req.optimizer(), "optimizer", &config)
                   : InvalidArgument("optimizer must be set (sgd or adam)");
    if (s.ok()) {
      s = RunOnModel(slot, Want::kExclusive, [&](ModelEntry& e, Access) -> Status {
        NORMD_RETURN_IF_ERROR(e.model().UpdateOptimizer(config));
        e.SetOptimizerSpec(req.optimizer());
        ++e.mutations;
        e.Publish();
        return Status::Ok();
      });
    }
    const bool valid = kind != 2 && std::isfinite(lr) && lr > 0;
    StatusCode want = StatusCode::kOk;
    if (!valid) {
      want = StatusCode::kInvalidArgument;
    } else if (!slots_[slot].exists) {
      want = StatusCode::kNotFound;
    } else if (want_adam != adam_model) {
      want = StatusCode::kInvalidArgument;
    }
    Expect(s, want, kUpdateOptimizer);
    if (s.ok() && lr >= 0.5f) tainted_ = true;  // such a rate may diverge to Inf legitimately
    return s;
  }

  const uint8_t config_;
  const v1::ModelSpec spec_;
  server::Registry registry_;
  Slot slots_[2];
  std::shared_ptr<ModelEntry> entry_;
  int current_ = 0;
  // Set once extreme values (1e30 inputs, huge learning rates) went in: from then on a
  // non-finite value is the arithmetic's honest answer, not a bug.
  bool tainted_ = false;
};

}  // namespace
}  // namespace normd::fuzz

extern "C" int LLVMFuzzerInitialize(int* /*argc*/, char*** /*argv*/) {
  google::protobuf::SetLogHandler(nullptr);  // parse failures are expected, not news
  normd::fuzz::Harness::Init();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  normd::fuzz::ByteReader in(data, size);
  normd::fuzz::Harness harness(in.Byte());
  harness.Run(in);
  return 0;
}
