// ComputePool: a fixed set of threads that run the service's model work (forward, backward,
// steps, state copies), so no gRPC thread ever waits on long compute.
//
// Fairness between tenants (server/tenant.h). Every task belongs to a tenant. Each tenant's
// tasks run in submission order, and the tenants with queued tasks are served round-robin: a
// tenant with many streams gets one turn per round like a tenant with a single call, instead of
// the first-come-first-served order that let a flood take every thread. And while more than one
// tenant is active (has work queued or running, or submitted some in the last kActiveWindow), no
// tenant runs on more than threads - 1 threads at once, so one thread is always left for the
// others: a small request of one tenant waits for no long task of another. With a single
// active tenant (the only one there is, without tenants) it may use every thread, as before.
//
// The pool never blocks a thread on a model lock: ModelEntry (server/registry.h) queues work per
// model and hands the pool only tasks that can run at once.
// Each pool thread may use `threads_per_task` cores for one task (the core's compute budget,
// core/threads.h); threads x threads_per_task should not exceed the cores, so the pool never
// oversubscribes them. Where the core spends a budget by borrowing idle cores
// (ComputeBorrowsIdleCores), every task gets the budget of all threads x threads_per_task
// cores instead, and a thread holds one core (ScopedComputeCore) while it runs a task: a task
// running alone then computes on two cores, tasks running together on one each. A task taken
// while other tenants are active gets `threads_per_task` and borrows nothing: the core kept for
// the others must be free the moment their request arrives, not after a borrowed half product
// (milliseconds at the reference MLP's batch 1024) has finished on it. So while several tenants
// are active each computes on the threads it holds; a lone tenant on every core.
//
// Thread safety: Submit may be called from any thread.
#ifndef NORMD_SERVER_COMPUTE_POOL_H_
#define NORMD_SERVER_COMPUTE_POOL_H_

#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace normd::server {

class ComputePool {
 public:
  // How long a tenant counts as active after its last submission, by default: a client sending
  // requests one after another is active between them, so its next request finds a thread free.
  static constexpr std::chrono::milliseconds kActiveWindow{1000};

  // REQUIRES: threads >= 1, threads_per_task >= 1, active_window > 0.
  ComputePool(int threads, int threads_per_task,
              std::chrono::milliseconds active_window = kActiveWindow);
  // Runs every queued task, then joins the threads.
  ~ComputePool();
  ComputePool(const ComputePool&) = delete;
  ComputePool& operator=(const ComputePool&) = delete;

  // Queues `task` as work of `tenant`.
  void Submit(const std::string& tenant, std::function<void()> task);
  // Whether submitted tasks are waiting for a thread.
  bool HasQueued();
  int threads() const { return static_cast<int>(threads_.size()); }

 private:
  using Clock = std::chrono::steady_clock;
  struct Tenant {
    std::deque<std::function<void()>> tasks;
    int running = 0;
    Clock::time_point last_submit;
  };

  void Run();
  // Takes the next task that may run now, round-robin over the tenants with queued tasks; false
  // when none may. *shared: whether another tenant was active. REQUIRES: mu_
  bool TakeLocked(Clock::time_point now, std::function<void()>* task, std::string* tenant,
                  bool* shared);
  // Whether a tenant other than `self` is active at `now`. REQUIRES: mu_
  bool OthersActiveLocked(const std::string& self, Clock::time_point now) const;

  const std::chrono::milliseconds active_window_;
  const int shared_budget_;  // a task's compute budget while other tenants are active
  const int alone_budget_;   // and while none is
  std::mutex mu_;
  std::condition_variable cv_;
  std::map<std::string, Tenant> tenants_;  // GUARDED_BY(mu_); idle ones are dropped
  std::deque<std::string> turns_;          // tenants with queued tasks, in service order; GUARDED_BY(mu_)
  int queued_ = 0;                         // GUARDED_BY(mu_)
  bool stopping_ = false;                  // GUARDED_BY(mu_)
  std::vector<std::thread> threads_;
};

}  // namespace normd::server

#endif  // NORMD_SERVER_COMPUTE_POOL_H_
