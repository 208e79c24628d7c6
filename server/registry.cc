#include "server/registry.h"

#include <malloc.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <cstdio>
#include <limits>
#include <random>

namespace normd::server {
namespace {

constexpr size_t kMaxIdLength = 64;
// How many released forward ids an entry remembers for precise error messages.
constexpr size_t kMaxReleasedNotes = 256;
// Records kept for reuse by shared forwards (each holds one batch's activations).
constexpr size_t kMaxFreeRecords = 4;

bool IsIdChar(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
         c == '.' || c == '_' || c == '-';
}

uint64_t SplitMix(uint64_t* state) {
  uint64_t z = (*state += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// Over every layer of the tree: a residual block's layers keep their outputs too.
int64_t MaxSampleElements(const Sequential& net) {
  int64_t m = net.input_shape().NumElements();
  for (const LayerNode& node : net.nodes()) m = std::max(m, node.output_shape.NumElements());
  return m;
}

int64_t ForwardCostPerSample(const Sequential& net) {
  int64_t cost = 0;
  for (const LayerNode& node : net.nodes()) {
    const Shape& out = node.output_shape;
    const int64_t elements = out.NumElements();
    // A layer applies its parameters at most once per position of its output's trailing
    // (spatial) dimensions: exact for Linear, an upper bound for Conv2d and the norms. A
    // residual block's own work is its addition; its parameters are its layers'.
    const int64_t positions = out.rank() > 1 && out[0] > 0 ? elements / out[0] : 1;
    const int64_t params =
        node.layer->AsResidualBlock() != nullptr ? 0 : node.layer->NumParameters();
    const int64_t layer = SaturatingMul(params, positions);
    const int64_t max = std::numeric_limits<int64_t>::max();
    cost = layer > max - cost - elements ? max : cost + layer + elements;
  }
  return cost;
}

}  // namespace

Status ValidateModelId(const std::string& id, const std::string& field) {
  if (id.empty() || id.size() > kMaxIdLength) {
    return InvalidArgument(field, " must be 1 to ", kMaxIdLength, " characters, got ", id.size());
  }
  if (id[0] == '.') return InvalidArgument(field, " must not start with '.', got '", id, "'");
  for (char c : id) {
    if (!IsIdChar(c)) {
      return InvalidArgument(field, " may contain only letters, digits, '.', '_' and '-', got '",
                             id, "'");
    }
  }
  return Status::Ok();
}

// --- ModelEntry --------------------------------------------------------------------------------

ModelEntry::ModelEntry(std::shared_ptr<TenantUsage> tenant, std::string id, v1::ModelSpec spec,
                       std::unique_ptr<Model> model, std::unique_ptr<ModelMetrics> metrics,
                       const RegistryLimits& limits, ComputePool* pool)
    : tenant_(std::move(tenant)),
      id_(std::move(id)),
      name_(DisplayName(tenant_->tenant, id_)),
      limits_(limits),
      pool_(pool),
      spec_(std::move(spec)),
      model_(std::move(model)),
      metrics_(std::move(metrics)) {
  max_sample_elements_ = MaxSampleElements(model_->net());
  forward_cost_per_sample_ = ForwardCostPerSample(model_->net());
  training_ = model_->training();
  summary_ = SummarizeModel(*model_);
  summary_spec_ = spec_;
  if (metrics_ != nullptr) {
    metrics_->SetBatchNormStatus(summary_.batch_norms);
    metrics_->SetLearningRate(summary_.learning_rate);
  }
}

ModelEntry::~ModelEntry() {
  model_.reset();
  train_record = ForwardRecord();
  free_records_.clear();
  retained_.clear();
  malloc_trim(0);
}

Status ModelEntry::CheckQueueLimitsLocked() const {
  const int in_flight =
      static_cast<int>(queue_.size()) + running_shared_ + (running_exclusive_ ? 1 : 0);
  if (in_flight >= limits_.max_queued_per_model) {
    return ResourceExhausted("model '", id_, "' already has ", in_flight,
                             " requests queued or running (the limit is ",
                             limits_.max_queued_per_model, "); retry later");
  }
  const int tenant_in_flight = tenant_->in_flight.load(std::memory_order_relaxed);
  if (tenant_in_flight >= limits_.tenant_max_queued) {
    return ResourceExhausted("tenant '", tenant_->tenant, "' already has ", tenant_in_flight,
                             " requests queued or running on its models (its quota, "
                             "--tenant-max-queued, is ", limits_.tenant_max_queued,
                             "); retry later");
  }
  return Status::Ok();
}

Status ModelEntry::Schedule(const std::shared_ptr<ModelEntry>& self, Want want,
                            std::function<void(Access)> task) {
  std::lock_guard<std::mutex> lock(sched_mu_);
  NORMD_RETURN_IF_ERROR(CheckQueueLimitsLocked());
  tenant_->in_flight.fetch_add(1, std::memory_order_relaxed);
  queue_.push_back(Queued{want, std::move(task)});
  DispatchLocked(self);
  return Status::Ok();
}

bool ModelEntry::TryRunInline(const std::shared_ptr<ModelEntry>& self, Want want,
                              const std::function<void(Access)>& task) {
  Access access;
  {
    std::lock_guard<std::mutex> lock(sched_mu_);
    // Anything queued runs first (FIFO); at a limit, Schedule answers RESOURCE_EXHAUSTED.
    if (!queue_.empty() || !CheckQueueLimitsLocked().ok()) return false;
    access = AccessFor(want);
    if (!StartLocked(access)) return false;
    tenant_->in_flight.fetch_add(1, std::memory_order_relaxed);
  }
  task(access);
  Done(self, access);
  return true;
}

ModelEntry::Access ModelEntry::AccessFor(Want want) const {
  return want == Want::kExclusive ||
                 (want == Want::kByMode && training_.load(std::memory_order_acquire))
             ? Access::kExclusive
             : Access::kShared;
}

bool ModelEntry::StartLocked(Access access) {
  if (running_exclusive_ || (access == Access::kExclusive && running_shared_ > 0)) return false;
  if (access == Access::kExclusive) {
    running_exclusive_ = true;
  } else {
    ++running_shared_;
  }
  return true;
}

void ModelEntry::ReleaseLocked(Access access) {
  if (access == Access::kExclusive) {
    running_exclusive_ = false;
  } else {
    --running_shared_;
  }
  tenant_->in_flight.fetch_sub(1, std::memory_order_relaxed);
}

void ModelEntry::DispatchLocked(const std::shared_ptr<ModelEntry>& self) {
  while (!queue_.empty()) {
    Queued& front = queue_.front();
    const Access access = AccessFor(front.want);
    // Strict FIFO: a waiting exclusive task holds back the shared ones behind it, so a writer
    // is never starved by a stream of readers.
    if (!StartLocked(access)) return;
    pool_->Submit(tenant_->tenant, [self, granted = access, task = std::move(front.task)]() mutable {
      for (;;) {
        task(granted);
        if (!self->DoneAndTakeNext(self, &granted, &task)) return;
      }
    });
    queue_.pop_front();
  }
}

bool ModelEntry::DoneAndTakeNext(const std::shared_ptr<ModelEntry>& self, Access* access,
                                 std::function<void(Access)>* task) {
  std::lock_guard<std::mutex> lock(sched_mu_);
  ReleaseLocked(*access);
  // The model's next task stays on this thread when it may run now and nothing else waits for
  // the pool: a hand-off would wake another pool thread, cold caches, and let the next step
  // start while this thread still holds its core (ScopedComputeCore), so the step's first
  // products could not split. With other work queued, the pool's FIFO order decides as usual.
  bool take = false;
  if (!queue_.empty() && !pool_->HasQueued()) {
    Queued& front = queue_.front();
    const Access next = AccessFor(front.want);
    if (StartLocked(next)) {
      *access = next;
      *task = std::move(front.task);
      queue_.pop_front();
      take = true;
    }
  }
  DispatchLocked(self);
  return take;
}

void ModelEntry::Done(const std::shared_ptr<ModelEntry>& self, Access access) {
  std::lock_guard<std::mutex> lock(sched_mu_);
  ReleaseLocked(access);
  DispatchLocked(self);
}

void ModelEntry::Publish() {
  ModelSummary s = SummarizeModel(*model_);
  training_.store(s.training, std::memory_order_release);
  if (metrics_ != nullptr) {
    metrics_->SetBatchNormStatus(s.batch_norms);
    metrics_->SetLearningRate(s.learning_rate);
  }
  std::lock_guard<std::mutex> lock(summary_mu_);
  summary_ = std::move(s);
}

void ModelEntry::SetOptimizerSpec(const v1::OptimizerSpec& optimizer) {
  *spec_.mutable_optimizer() = optimizer;
  std::lock_guard<std::mutex> lock(summary_mu_);
  *summary_spec_.mutable_optimizer() = optimizer;
}

void ModelEntry::PublishForward(const ForwardRecord& rec) {
  const Sequential& net = model_->net();
  std::lock_guard<std::mutex> lock(summary_mu_);
  summary_.step = model_->step();
  summary_.learning_rate = model_->learning_rate();
  for (const ForwardRecord::BatchNormReport& r : rec.batch_norms()) {
    for (BatchNormStatus& st : summary_.batch_norms) {
      if (st.layer != r.layer) continue;
      if (r.drift.valid) {
        st.last_mean_shift = static_cast<float>(r.drift.mean_shift);
        st.last_var_log_ratio = static_cast<float>(r.drift.var_log_ratio);
      }
      if (r.committed) {
        st.running_mean_update_norm = static_cast<float>(r.update.running_mean_update_norm);
        st.running_var_update_norm = static_cast<float>(r.update.running_var_update_norm);
        st.num_batches_tracked = net.node(st.layer).layer->AsBatchNorm()->num_batches_tracked();
      }
      break;
    }
  }
  if (metrics_ != nullptr) {
    metrics_->SetBatchNormStatus(summary_.batch_norms);
    metrics_->SetLearningRate(summary_.learning_rate);
  }
}

void ModelEntry::ToWire(v1::Model* out) const {
  std::lock_guard<std::mutex> lock(summary_mu_);
  ModelToWire(id_, summary_spec_, summary_, out);
  out->set_tenant(tenant_->tenant);
  out->set_world_size(limits_.world_size);
}

void ModelEntry::ExpireLocked() {
  const auto now = std::chrono::steady_clock::now();
  for (auto it = retained_.begin(); it != retained_.end();) {
    if (it->second.expires <= now) {
      released_[it->first] = StrCat("expired after ", limits_.retained_forward_timeout.count(),
                                    " ms without a Backward (--retained-forward-timeout)");
      it = retained_.erase(it);
    } else {
      ++it;
    }
  }
  while (released_.size() > kMaxReleasedNotes) released_.erase(released_.begin());
}

Status ModelEntry::ReserveRetained() {
  std::lock_guard<std::mutex> lock(retained_mu_);
  ExpireLocked();
  const int held = static_cast<int>(retained_.size()) + reserved_;
  if (held >= limits_.max_retained_forwards) {
    return ResourceExhausted("model '", id_, "' already retains ", held,
                             " forwards for Backward (the limit is ",
                             limits_.max_retained_forwards,
                             "); run Backward on them or let them expire");
  }
  ++reserved_;
  return Status::Ok();
}

void ModelEntry::CancelReservation() {
  std::lock_guard<std::mutex> lock(retained_mu_);
  --reserved_;
}

uint64_t ModelEntry::CommitRetained(std::unique_ptr<ForwardRecord> rec) {
  std::lock_guard<std::mutex> lock(retained_mu_);
  --reserved_;
  const uint64_t id = next_forward_id_++;
  retained_[id] =
      Retained{std::move(rec), std::chrono::steady_clock::now() + limits_.retained_forward_timeout};
  return id;
}

uint64_t ModelEntry::PeekNextForwardId() {
  std::lock_guard<std::mutex> lock(retained_mu_);
  return next_forward_id_;
}

std::vector<uint64_t> ModelEntry::RetainedIds() {
  std::lock_guard<std::mutex> lock(retained_mu_);
  ExpireLocked();
  std::vector<uint64_t> ids;
  for (const auto& [id, r] : retained_) ids.push_back(id);
  return ids;
}

Status ModelEntry::TakeRetained(uint64_t id, std::unique_ptr<ForwardRecord>* rec) {
  std::lock_guard<std::mutex> lock(retained_mu_);
  ExpireLocked();
  if (id == 0) {
    return FailedPrecondition("forward_id 0 names no forward: pass the forward_id of a Forward "
                              "run with retain_for_backward");
  }
  auto it = retained_.find(id);
  if (it != retained_.end()) {
    *rec = std::move(it->second.rec);
    retained_.erase(it);
    return Status::Ok();
  }
  auto rel = released_.find(id);
  if (rel != released_.end()) {
    return FailedPrecondition("forward_id ", id, " of model '", id_, "' is no longer retained: ",
                              rel->second);
  }
  if (id >= next_forward_id_) {
    return FailedPrecondition("forward_id ", id, " is unknown for model '", id_,
                              "': no Forward with retain_for_backward returned it");
  }
  return FailedPrecondition("forward_id ", id, " of model '", id_,
                            "' is no longer retained (released long ago)");
}

void ModelEntry::PutBackRetained(uint64_t id, std::unique_ptr<ForwardRecord> rec) {
  std::lock_guard<std::mutex> lock(retained_mu_);
  retained_[id] =
      Retained{std::move(rec), std::chrono::steady_clock::now() + limits_.retained_forward_timeout};
}

void ModelEntry::NoteReleased(uint64_t id, const std::string& reason) {
  std::lock_guard<std::mutex> lock(retained_mu_);
  released_[id] = reason;
  while (released_.size() > kMaxReleasedNotes) released_.erase(released_.begin());
}

void ModelEntry::ReleaseAllRetained(const std::string& reason) {
  std::lock_guard<std::mutex> lock(retained_mu_);
  for (auto& [id, r] : retained_) released_[id] = reason;
  retained_.clear();
  while (released_.size() > kMaxReleasedNotes) released_.erase(released_.begin());
}

int ModelEntry::retained_count() {
  std::lock_guard<std::mutex> lock(retained_mu_);
  ExpireLocked();
  return static_cast<int>(retained_.size());
}

std::unique_ptr<ForwardRecord> ModelEntry::AcquireRecord() {
  {
    std::lock_guard<std::mutex> lock(records_mu_);
    if (!free_records_.empty()) {
      std::unique_ptr<ForwardRecord> rec = std::move(free_records_.back());
      free_records_.pop_back();
      return rec;
    }
  }
  return std::make_unique<ForwardRecord>();
}

void ModelEntry::ReleaseRecord(std::unique_ptr<ForwardRecord> rec) {
  std::lock_guard<std::mutex> lock(records_mu_);
  if (free_records_.size() < kMaxFreeRecords) free_records_.push_back(std::move(rec));
}

// --- Registry ----------------------------------------------------------------------------------

Registry::Registry(const RegistryLimits& limits, Metrics* metrics, ComputePool* pool)
    : limits_(limits), metrics_(metrics), pool_(pool) {
  std::random_device rd;
  id_state_ = (uint64_t{rd()} << 32) ^ rd();
}

Sequential::Limits Registry::ModelLimits() const {
  Sequential::Limits l;
  l.max_parameters = limits_.max_parameters;
  l.max_layers = limits_.max_layers;
  l.max_sample_elements = limits_.max_batch_elements;
  return l;
}

std::string Registry::PickId(const std::string& tenant) {
  for (;;) {
    char buf[32];
    std::snprintf(buf, sizeof(buf), "m-%012llx",
                  static_cast<unsigned long long>(SplitMix(&id_state_) & 0xffffffffffffULL));
    const Key key(tenant, buf);
    if (models_.count(key) == 0 && creating_.count(key) == 0) return buf;
  }
}

std::shared_ptr<TenantUsage> Registry::UsageLocked(const std::string& tenant) {
  std::shared_ptr<TenantUsage>& u = tenants_[tenant];
  if (u == nullptr) {
    u = std::make_shared<TenantUsage>(tenant);
    if (metrics_ != nullptr) u->metrics = metrics_->Tenant(tenant);
  }
  return u;
}

void Registry::UnreserveLocked(const Key& key, TenantUsage& usage, int64_t parameters) {
  creating_.erase(key);
  --usage.models;
  usage.parameters -= parameters;
}

std::shared_ptr<ModelEntry> Registry::MakeEntry(std::shared_ptr<TenantUsage> tenant,
                                                const std::string& id, const v1::ModelSpec& spec,
                                                std::unique_ptr<Model> model) {
  std::unique_ptr<ModelMetrics> mm =
      metrics_ != nullptr ? metrics_->AddModel(tenant->tenant, id, tenant->metrics, model->net())
                          : nullptr;
  return std::make_shared<ModelEntry>(std::move(tenant), id, spec, std::move(model),
                                      std::move(mm), limits_, pool_);
}

Status Registry::Create(const Principal& who, const std::string& requested_name,
                        const v1::ModelSpec& spec, std::shared_ptr<ModelEntry>* out,
                        const std::function<Status(Model&)>& prepare) {
  // "TENANT/ID" creates in TENANT's namespace (admins, or the caller's own tenant); "TENANT/"
  // alone lets the server pick the id there; a plain id is the caller's tenant's.
  ModelName name;
  if (Status s = ResolveModelName(who, requested_name, &name); !s.ok()) {
    if (s.code() != StatusCode::kNotFound) return s;
    return PermissionDenied("tenant '", who.tenant, "' may create models only in its own "
                            "namespace (a plain id, or '", who.tenant, "/<id>')");
  }
  if (!name.id.empty()) NORMD_RETURN_IF_ERROR(ValidateModelId(name.id, "id"));
  ModelConfig config;
  NORMD_RETURN_IF_ERROR(SpecToConfig(spec, &config));

  std::shared_ptr<TenantUsage> usage;
  Key key(name.tenant, name.id);
  {
    std::unique_lock<std::shared_mutex> lock(mu_);
    if (!name.id.empty() && (models_.count(key) != 0 || creating_.count(key) != 0)) {
      return Status(StatusCode::kAlreadyExists,
                    StrCat("model '", requested_name, "' already exists"));
    }
    const size_t held = models_.size() + creating_.size();
    if (held >= static_cast<size_t>(limits_.max_models)) {
      return ResourceExhausted("the server holds ", held, " models, the limit (--max-models); "
                               "delete a model first");
    }
    usage = UsageLocked(name.tenant);
    if (usage->models >= limits_.tenant_max_models) {
      return ResourceExhausted("tenant '", name.tenant, "' holds ", usage->models,
                               " models, its quota (--tenant-max-models ",
                               limits_.tenant_max_models, "); delete one of its models first");
    }
    if (name.id.empty()) key.second = name.id = PickId(name.tenant);
    creating_.insert(key);
    ++usage->models;
  }
  int64_t reserved_parameters = 0;
  auto unreserve = [&] {
    std::unique_lock<std::shared_mutex> lock(mu_);
    UnreserveLocked(key, *usage, reserved_parameters);
  };

  std::unique_ptr<Model> model;
  Status s = Model::Create(config, ModelLimits(), &model);
  if (!s.ok()) {
    unreserve();
    return s.WithPrefix("spec");
  }
  {
    const int64_t parameters = model->net().parameter_count();
    std::unique_lock<std::shared_mutex> lock(mu_);
    if (parameters > limits_.tenant_max_parameters - usage->parameters) {
      s = ResourceExhausted("model '", requested_name, "' has ", parameters, " parameters; tenant '",
                            name.tenant, "' holds ", usage->parameters,
                            " in its models and its quota is ", limits_.tenant_max_parameters,
                            " (--tenant-max-parameters)");
      UnreserveLocked(key, *usage, 0);
      return s;
    }
    usage->parameters += parameters;
    reserved_parameters = parameters;
  }
  if (prepare) {
    s = prepare(*model);
    if (!s.ok()) {
      unreserve();
      return s;
    }
  }
  std::shared_ptr<ModelEntry> entry = MakeEntry(usage, name.id, spec, std::move(model));
  if (persistence_ != nullptr) {
    std::unique_lock<std::shared_mutex> entry_lock(entry->mu());
    s = persistence_->OnCreate(*entry);
    if (!s.ok()) {
      entry->DropMetrics();
      unreserve();
      return s;
    }
  }
  int count;
  {
    std::unique_lock<std::shared_mutex> lock(mu_);
    creating_.erase(key);
    models_[key] = entry;
    count = static_cast<int>(models_.size());
  }
  if (metrics_ != nullptr) metrics_->SetModelCount(count);
  *out = entry;
  return Status::Ok();
}

Status Registry::Restore(const std::string& tenant, const std::string& id,
                         const v1::ModelSpec& spec, std::unique_ptr<Model> model) {
  NORMD_RETURN_IF_ERROR(ValidateTenantName(tenant, "tenant"));
  NORMD_RETURN_IF_ERROR(ValidateModelId(id, "id"));
  const std::string name = DisplayName(tenant, id);
  int count;
  {
    std::unique_lock<std::shared_mutex> lock(mu_);
    const Key key(tenant, id);
    if (models_.count(key) != 0 || creating_.count(key) != 0) {
      return Status(StatusCode::kAlreadyExists, StrCat("model '", name, "' already exists"));
    }
    if (models_.size() + creating_.size() >= static_cast<size_t>(limits_.max_models)) {
      return ResourceExhausted("cannot restore model '", name, "': the server already holds ",
                               models_.size(), " models (--max-models)");
    }
    std::shared_ptr<TenantUsage> usage = UsageLocked(tenant);
    ++usage->models;
    usage->parameters += model->net().parameter_count();
    models_[key] = MakeEntry(std::move(usage), id, spec, std::move(model));
    count = static_cast<int>(models_.size());
  }
  if (metrics_ != nullptr) metrics_->SetModelCount(count);
  return Status::Ok();
}

Status Registry::Find(const Principal& who, const std::string& name,
                      std::shared_ptr<ModelEntry>* out) const {
  ModelName resolved;
  NORMD_RETURN_IF_ERROR(ResolveModelName(who, name, &resolved));
  {
    std::shared_lock<std::shared_mutex> lock(mu_);
    auto it = models_.find(Key(resolved.tenant, resolved.id));
    if (it != models_.end()) {
      *out = it->second;
      return Status::Ok();
    }
  }
  NORMD_RETURN_IF_ERROR(ValidateModelId(resolved.id, "model"));
  return NotFound("model '", name, "' not found");
}

Status Registry::Remove(ModelEntry& entry) {
  if (persistence_ != nullptr) NORMD_RETURN_IF_ERROR(persistence_->OnDelete(entry));
  entry.set_deleted();
  entry.ReleaseAllRetained("the model was deleted");
  entry.DropMetrics();
  int count;
  {
    std::unique_lock<std::shared_mutex> lock(mu_);
    models_.erase(Key(entry.tenant(), entry.id()));
    TenantUsage& usage = entry.usage();
    --usage.models;
    usage.parameters -= entry.model().net().parameter_count();
    count = static_cast<int>(models_.size());
  }
  if (metrics_ != nullptr) metrics_->SetModelCount(count);
  return Status::Ok();
}

std::vector<std::shared_ptr<ModelEntry>> Registry::List() const {
  std::shared_lock<std::shared_mutex> lock(mu_);
  std::vector<std::shared_ptr<ModelEntry>> out;
  out.reserve(models_.size());
  for (const auto& [key, e] : models_) out.push_back(e);
  return out;
}

std::vector<std::shared_ptr<ModelEntry>> Registry::List(const Principal& who) const {
  if (who.admin) return List();
  std::shared_lock<std::shared_mutex> lock(mu_);
  std::vector<std::shared_ptr<ModelEntry>> out;
  for (auto it = models_.lower_bound(Key(who.tenant, "")); it != models_.end(); ++it) {
    if (it->first.first != who.tenant) break;
    out.push_back(it->second);
  }
  return out;
}

int Registry::size() const {
  std::shared_lock<std::shared_mutex> lock(mu_);
  return static_cast<int>(models_.size());
}

}  // namespace normd::server
