#include "server/compute_pool.h"

#include <cassert>

#include "core/threads.h"

namespace normd::server {

ComputePool::ComputePool(int threads, int threads_per_task) {
  assert(threads >= 1 && threads_per_task >= 1);
  const int budget = ComputeBorrowsIdleCores() ? threads * threads_per_task : threads_per_task;
  threads_.reserve(threads);
  for (int i = 0; i < threads; ++i) {
    threads_.emplace_back([this, budget] { Run(budget); });
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

void ComputePool::Submit(std::function<void()> task) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    queue_.push_back(std::move(task));
  }
  cv_.notify_one();
}

bool ComputePool::HasQueued() {
  std::lock_guard<std::mutex> lock(mu_);
  return !queue_.empty();
}

void ComputePool::Run(int budget) {
  SetComputeThreads(budget);
  for (;;) {
    std::function<void()> task;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stopping, and nothing left to run
      task = std::move(queue_.front());
      queue_.pop_front();
    }
    ScopedComputeCore core;
    task();
  }
}

}  // namespace normd::server
