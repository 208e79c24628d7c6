// ComputePool: a fixed set of threads that run the service's model work (forward, backward,
// steps, state copies), so no gRPC thread ever waits on long compute.
//
// Tasks run in submission order. The pool never blocks a thread on a model lock: ModelEntry
// (server/registry.h) queues work per model and hands the pool only tasks that can run at once.
// Each pool thread may use `threads_per_task` cores for one task (the core's compute budget,
// core/threads.h); threads x threads_per_task should not exceed the cores, so the pool never
// oversubscribes them. Where the core spends a budget by borrowing idle cores
// (ComputeBorrowsIdleCores), every task gets the budget of all threads x threads_per_task
// cores instead, and a thread holds one core (ScopedComputeCore) while it runs a task: a task
// running alone then computes on two cores, tasks running together on one each.
//
// Thread safety: Submit may be called from any thread.
#ifndef NORMD_SERVER_COMPUTE_POOL_H_
#define NORMD_SERVER_COMPUTE_POOL_H_

#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace normd::server {

class ComputePool {
 public:
  // REQUIRES: threads >= 1, threads_per_task >= 1.
  ComputePool(int threads, int threads_per_task);
  // Runs every queued task, then joins the threads.
  ~ComputePool();
  ComputePool(const ComputePool&) = delete;
  ComputePool& operator=(const ComputePool&) = delete;

  void Submit(std::function<void()> task);
  // Whether submitted tasks are waiting for a thread.
  bool HasQueued();
  int threads() const { return static_cast<int>(threads_.size()); }

 private:
  void Run(int budget);

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> queue_;  // GUARDED_BY(mu_)
  bool stopping_ = false;                    // GUARDED_BY(mu_)
  std::vector<std::thread> threads_;
};

}  // namespace normd::server

#endif  // NORMD_SERVER_COMPUTE_POOL_H_
