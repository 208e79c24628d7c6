#include "server/checkpoint_persistence.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <filesystem>
#include <shared_mutex>
#include <utility>
#include <vector>

#include "core/config.h"
#include "core/model.h"
#include "server/convert.h"
#include "server/registry.h"

namespace normd::server {

using Clock = std::chrono::steady_clock;

CheckpointPersistence::CheckpointPersistence(CheckpointPersistenceOptions options)
    : options_(std::move(options)) {
  writer_ = std::thread([this] { WriterLoop(); });
}

CheckpointPersistence::~CheckpointPersistence() { StopWriter(); }

CheckpointPersistence::Stats CheckpointPersistence::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return stats_;
}

std::string CheckpointPersistence::TenantDir(const std::string& tenant) const {
  if (tenant == kDefaultTenant) return options_.data_dir;
  return (std::filesystem::path(options_.data_dir) / (kTenantDirPrefix + tenant)).string();
}

std::shared_ptr<CheckpointPersistence::Tracked> CheckpointPersistence::Track(
    const ModelEntry& entry) {
  std::shared_ptr<Tracked>& t = models_[entry.name()];
  if (t == nullptr) {
    t = std::make_shared<Tracked>();
    t->dir = TenantDir(entry.tenant());
  }
  return t;
}

std::shared_ptr<CheckpointPersistence::Tracked> CheckpointPersistence::Find(
    const std::string& id) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = models_.find(id);
  return it == models_.end() ? nullptr : it->second;
}

Status CheckpointPersistence::Snapshot(ModelEntry& entry, Tracked* t, CheckpointSnapshot* snap,
                                       uint64_t* gen, uint64_t* changes) {
  NORMD_RETURN_IF_ERROR(SnapshotCheckpoint(entry.id(), entry.spec(), entry.model(), snap));
  std::lock_guard<std::mutex> lock(mu_);
  *gen = t->next_gen++;
  *changes = t->changes;
  t->snap_step = std::max(t->snap_step, snap->step);
  return Status::Ok();
}

Status CheckpointPersistence::Write(Tracked* t, const CheckpointSnapshot& snap, uint64_t gen,
                                    uint64_t changes) {
  std::lock_guard<std::mutex> write_lock(t->write_mu);
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (t->deleted) return Status::Ok();
  }
  // A newer snapshot is on disk already: this one would roll the model back.
  if (gen <= t->written_gen) return Status::Ok();
  SaveInfo info;
  const Status st = WriteCheckpoint(t->dir, snap, options_.keep_last, &info);
  std::lock_guard<std::mutex> lock(mu_);
  if (!st.ok()) {
    ++stats_.failures;
    spdlog::error("event=checkpoint_failed model={} step={} error=\"{}\"", snap.model_id,
                  snap.step, st.message());
    return st;
  }
  t->written_gen = gen;
  ++stats_.saves;
  t->saved_changes = std::max(t->saved_changes, changes);
  t->saved_step = snap.step;
  if (t->changes > t->saved_changes) t->dirty_since = Clock::now();
  spdlog::debug("event=checkpoint_saved model={} step={} seq={} bytes={}", snap.model_id,
                snap.step, info.seq, info.bytes);
  return Status::Ok();
}

Status CheckpointPersistence::RestoreAll(Registry* registry) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    registry_ = registry;
  }
  std::vector<std::string> tenants;
  NORMD_RETURN_IF_ERROR(ScanTenantDirs(options_.data_dir, &tenants));
  // "@default" would be a second directory for the default tenant's models: not read.
  tenants.erase(std::remove(tenants.begin(), tenants.end(), kDefaultTenant), tenants.end());
  tenants.insert(tenants.begin(), kDefaultTenant);
  for (const std::string& tenant : tenants) {
    NORMD_RETURN_IF_ERROR(RestoreTenant(registry, tenant));
  }
  return Status::Ok();
}

Status CheckpointPersistence::RestoreTenant(Registry* registry, const std::string& tenant) {
  const std::string dir = TenantDir(tenant);
  std::vector<std::string> ids;
  NORMD_RETURN_IF_ERROR(ScanDataDir(dir, &ids));
  for (const std::string& id : ids) {
    const std::string name = DisplayName(tenant, id);
    std::unique_ptr<Model> model;
    auto build = [&](const LoadedCheckpoint& ckpt) -> Status {
      ModelConfig config;
      NORMD_RETURN_IF_ERROR(SpecToConfig(ckpt.spec, &config).WithPrefix("spec"));
      std::unique_ptr<Model> m;
      NORMD_RETURN_IF_ERROR(Model::Create(config, registry->ModelLimits(), &m).WithPrefix("spec"));
      NORMD_RETURN_IF_ERROR(RestoreInto(ckpt, m.get()));
      model = std::move(m);
      return Status::Ok();
    };
    LoadedCheckpoint ckpt;
    LoadReport report;
    Status st = LoadLatestCheckpoint(dir, id, &ckpt, build, &report);
    if (st.ok()) st = registry->Restore(tenant, id, ckpt.spec, std::move(model));
    std::lock_guard<std::mutex> lock(mu_);
    if (!st.ok()) {
      ++stats_.not_restored;
      spdlog::error("event=restore_failed model={} error=\"{}\"", name, st.message());
      continue;
    }
    ++stats_.restored;
    std::shared_ptr<Tracked>& t = models_[name];
    t = std::make_shared<Tracked>();
    t->dir = dir;
    t->saved_step = t->snap_step = ckpt.step;
    spdlog::info("event=model_restored model={} step={} mode={} checkpoint={} rejected={}", name,
                 ckpt.step, ckpt.training ? "train" : "eval", ckpt.path, report.rejected.size());
  }
  return Status::Ok();
}

Status CheckpointPersistence::OnCreate(ModelEntry& entry) {
  std::shared_ptr<Tracked> t;
  {
    std::lock_guard<std::mutex> lock(mu_);
    t = std::make_shared<Tracked>();
    t->dir = TenantDir(entry.tenant());
    models_[entry.name()] = t;  // a model deleted under this name keeps its own (deleted) record
  }
  // Files under this id belong to no model in memory (one that could not be restored): they
  // must not become this model's "previous checkpoint".
  std::error_code ec;
  if (std::filesystem::exists(std::filesystem::path(t->dir) / entry.id(), ec)) {
    spdlog::warn("event=stale_files_removed model={} reason=\"a new model takes this id\"",
                 entry.name());
    NORMD_RETURN_IF_ERROR(RemoveModelFiles(t->dir, entry.id()));
  }
  CheckpointSnapshot snap;
  uint64_t gen = 0, changes = 0;
  Status st = Snapshot(entry, t.get(), &snap, &gen, &changes);
  if (st.ok()) st = Write(t.get(), snap, gen, changes);
  if (!st.ok()) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = models_.find(entry.name());
    if (it != models_.end() && it->second == t) models_.erase(it);
    return st.WithPrefix("cannot persist the new model");
  }
  return Status::Ok();
}

void CheckpointPersistence::OnMutation(ModelEntry& entry, Mutation what) {
  std::shared_ptr<Tracked> t;
  bool snapshot = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    t = Track(entry);
    const Clock::time_point now = Clock::now();
    if (t->changes == t->saved_changes && t->pending == nullptr) t->dirty_since = now;
    ++t->changes;
    if (what == Mutation::kStep && options_.autosave_steps > 0 &&
        entry.model().step() >= t->snap_step + options_.autosave_steps) {
      snapshot = true;
    }
    if (options_.autosave_interval.count() > 0 && t->pending == nullptr &&
        now - t->dirty_since >= options_.autosave_interval) {
      snapshot = true;
    }
  }
  if (!snapshot) return;
  auto snap = std::make_unique<CheckpointSnapshot>();
  uint64_t gen = 0, changes = 0;
  const Status st = Snapshot(entry, t.get(), snap.get(), &gen, &changes);
  if (!st.ok()) {
    spdlog::error("event=checkpoint_failed model={} error=\"{}\"", entry.name(), st.message());
    return;
  }
  std::lock_guard<std::mutex> lock(mu_);
  t->pending = std::move(snap);  // supersedes an older snapshot still waiting
  t->pending_gen = gen;
  t->pending_changes = changes;
  work_ = true;
  cv_.notify_one();
}

Status CheckpointPersistence::Save(ModelEntry& entry, uint64_t* step) {
  std::shared_ptr<Tracked> t;
  {
    std::lock_guard<std::mutex> lock(mu_);
    t = Track(entry);
  }
  CheckpointSnapshot snap;
  uint64_t gen = 0, changes = 0;
  NORMD_RETURN_IF_ERROR(Snapshot(entry, t.get(), &snap, &gen, &changes));
  NORMD_RETURN_IF_ERROR(Write(t.get(), snap, gen, changes));
  *step = snap.step;
  return Status::Ok();
}

Status CheckpointPersistence::OnDelete(ModelEntry& entry) {
  std::shared_ptr<Tracked> t = Find(entry.name());
  std::unique_lock<std::mutex> write_lock;
  if (t != nullptr) write_lock = std::unique_lock<std::mutex>(t->write_mu);
  NORMD_RETURN_IF_ERROR(RemoveModelFiles(TenantDir(entry.tenant()), entry.id()));
  std::lock_guard<std::mutex> lock(mu_);
  if (t != nullptr) {
    // Set while the write lock is held: a write waiting for it sees the flag and skips.
    t->deleted = true;
    t->pending.reset();
    auto it = models_.find(entry.name());
    if (it != models_.end() && it->second == t) models_.erase(it);
  }
  return Status::Ok();
}

void CheckpointPersistence::OnShutdown(Registry* registry) {
  StopWriter();  // finishes the writes already queued
  int saved = 0, failed = 0;
  for (const std::shared_ptr<ModelEntry>& entry : registry->List()) {
    std::shared_ptr<Tracked> t = Find(entry->name());
    if (t == nullptr) continue;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (t->changes == t->saved_changes) continue;
    }
    CheckpointSnapshot snap;
    uint64_t gen = 0, changes = 0;
    Status st;
    {
      std::shared_lock<std::shared_mutex> lock(entry->mu());
      if (entry->deleted()) continue;
      st = Snapshot(*entry, t.get(), &snap, &gen, &changes);
    }
    if (st.ok()) st = Write(t.get(), snap, gen, changes);
    if (st.ok()) {
      ++saved;
    } else {
      ++failed;
      spdlog::error("event=shutdown_save_failed model={} error=\"{}\"", entry->name(),
                    st.message());
    }
  }
  spdlog::info("event=shutdown_saved models={} failed={}", saved, failed);
}

void CheckpointPersistence::StopWriter() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
    registry_ = nullptr;
  }
  cv_.notify_one();
  if (writer_.joinable()) writer_.join();
}

void CheckpointPersistence::WriterLoop() {
  const bool timed = options_.autosave_interval.count() > 0;
  const auto tick = std::min<std::chrono::milliseconds>(
      std::chrono::seconds(1), std::max<std::chrono::milliseconds>(
                                   std::chrono::milliseconds(10), options_.autosave_interval / 4));
  std::unique_lock<std::mutex> lock(mu_);
  while (true) {
    if (!work_ && !stop_) {
      if (timed) {
        cv_.wait_for(lock, tick);
      } else {
        cv_.wait(lock, [this] { return work_ || stop_; });
      }
    }
    struct Job {
      std::shared_ptr<Tracked> t;
      std::unique_ptr<CheckpointSnapshot> snap;
      uint64_t gen, changes;
    };
    std::vector<Job> jobs;
    for (auto& [id, t] : models_) {
      if (t->pending != nullptr) {
        jobs.push_back(Job{t, std::move(t->pending), t->pending_gen, t->pending_changes});
      }
    }
    work_ = false;
    const bool stopping = stop_;
    lock.unlock();
    for (Job& j : jobs) Write(j.t.get(), *j.snap, j.gen, j.changes);  // failures are logged
    if (timed && !stopping) SnapshotStaleModels();
    lock.lock();
    if (stopping && !work_) return;
  }
}

void CheckpointPersistence::SnapshotStaleModels() {
  Registry* registry;
  std::vector<std::string> ids;
  {
    std::lock_guard<std::mutex> lock(mu_);
    registry = registry_;
    if (registry == nullptr) return;
    const Clock::time_point now = Clock::now();
    for (const auto& [id, t] : models_) {
      if (!t->deleted && t->pending == nullptr && t->changes > t->saved_changes &&
          now - t->dirty_since >= options_.autosave_interval) {
        ids.push_back(id);
      }
    }
  }
  for (const std::string& id : ids) {
    std::shared_ptr<ModelEntry> entry;
    std::shared_ptr<Tracked> t = Find(id);
    // `id` is the model's display name, which an admin principal resolves back to it.
    if (t == nullptr || !registry->Find(Principal(), id, &entry).ok()) continue;
    CheckpointSnapshot snap;
    uint64_t gen = 0, changes = 0;
    {
      // Never wait for the model: a busy one is snapshotted by its next mutation or next tick.
      std::shared_lock<std::shared_mutex> lock(entry->mu(), std::try_to_lock);
      if (!lock.owns_lock() || entry->deleted()) continue;
      if (!Snapshot(*entry, t.get(), &snap, &gen, &changes).ok()) continue;
    }
    Write(t.get(), snap, gen, changes);
  }
}

}  // namespace normd::server
