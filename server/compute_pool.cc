#include "server/compute_pool.h"

#include <algorithm>
#include <cassert>

#include "core/threads.h"

namespace normd::server {

ComputePool::ComputePool(int threads, int threads_per_task,
                         std::chrono::milliseconds active_window)
    : active_window_(active_window),
      shared_budget_(threads_per_task),
      alone_budget_(ComputeBorrowsIdleCores() ? threads * threads_per_task : threads_per_task) {
  assert(threads >= 1 && threads_per_task >= 1 && active_window.count() > 0);
  threads_.reserve(threads);
  for (int i = 0; i < threads; ++i) {
    threads_.emplace_back([this] { Run(); });
  }
}

ComputePool::~ComputePool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  for (std::thread& t : threads_) t.join();
}

void ComputePool::Submit(const std::string& tenant, std::function<void()> task) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    Tenant& t = tenants_[tenant];
    if (t.tasks.empty()) turns_.push_back(tenant);
    t.tasks.push_back(std::move(task));
    t.last_submit = Clock::now();
    ++queued_;
  }
  // Every thread re-checks: the new task may be the one a held-back thread can now take, or
  // it may hold another tenant back from a free thread.
  cv_.notify_all();
}

bool ComputePool::HasQueued() {
  std::lock_guard<std::mutex> lock(mu_);
  return queued_ > 0;
}

bool ComputePool::OthersActiveLocked(const std::string& self, Clock::time_point now) const {
  for (const auto& [name, t] : tenants_) {
    if (name == self) continue;
    if (!t.tasks.empty() || t.running > 0 || now - t.last_submit < active_window_) return true;
  }
  return false;
}

bool ComputePool::TakeLocked(Clock::time_point now, std::function<void()>* task,
                             std::string* tenant, bool* shared) {
  const int all = threads();
  for (auto it = turns_.begin(); it != turns_.end(); ++it) {
    Tenant& t = tenants_[*it];
    *shared = all > 1 && OthersActiveLocked(*it, now);
    const int cap = *shared ? all - 1 : all;
    if (t.running >= cap) continue;
    *tenant = *it;
    *task = std::move(t.tasks.front());
    t.tasks.pop_front();
    ++t.running;
    --queued_;
    turns_.erase(it);
    if (!t.tasks.empty()) turns_.push_back(*tenant);  // its next turn comes after the others'
    return true;
  }
  return false;
}

void ComputePool::Run() {
  for (;;) {
    std::function<void()> task;
    std::string tenant;
    bool shared = false;
    {
      std::unique_lock<std::mutex> lock(mu_);
      for (;;) {
        if (queued_ == 0 && stopping_) return;  // nothing left to run
        if (queued_ > 0 && TakeLocked(Clock::now(), &task, &tenant, &shared)) break;
        // Nothing may run now. A tenant's activity window ending can free a held-back task,
        // so wake up by then even if no task finishes or arrives.
        cv_.wait_for(lock, queued_ > 0 ? active_window_ / 10 : active_window_);
      }
    }
    {
      // A task taken while other tenants are active does not borrow their core: a half product
      // lent to the idle core would hold it for milliseconds after another tenant's request
      // arrived for it.
      ScopedComputeThreads budget(shared ? shared_budget_ : alone_budget_);
      ScopedComputeCore core;
      task();
    }
    task = nullptr;  // drop what the task captured before taking the lock
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = tenants_.find(tenant);
      --it->second.running;
      // Forget idle tenants, so the map stays as small as the set of recent tenants.
      const Clock::time_point now = Clock::now();
      for (auto t = tenants_.begin(); t != tenants_.end();) {
        if (t->second.tasks.empty() && t->second.running == 0 &&
            now - t->second.last_submit >= active_window_) {
          t = tenants_.erase(t);
        } else {
          ++t;
        }
      }
    }
    cv_.notify_all();
  }
}

}  // namespace normd::server
