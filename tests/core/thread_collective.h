// ThreadCollective: a Collective (core/collective.h) over threads of one process, so core tests
// can run a data-parallel job of N ranks without MPI. Rank r's thread calls Rank(r)'s methods.
//
// Every operation meets at a barrier: each rank posts its buffer and, once all have, reads every
// rank's buffer in rank order (sums: rank 0's value, plus rank 1's, ...), so all ranks compute
// identical bits, as the contract asks; a second barrier keeps buffers unchanged until every
// rank has read them.
//
// Thread safety: one thread per rank, as the contract says.
#ifndef NORMD_TESTS_CORE_THREAD_COLLECTIVE_H_
#define NORMD_TESTS_CORE_THREAD_COLLECTIVE_H_

#include <condition_variable>
#include <cstdint>
#include <algorithm>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "core/collective.h"

namespace normd::testing {

class ThreadCollective {
 public:
  explicit ThreadCollective(int world) : world_(world), posted_(world) {
    for (int r = 0; r < world; ++r) ranks_.push_back(std::make_unique<Rank>(this, r));
  }

  Collective* rank(int r) { return ranks_[r].get(); }
  int size() const { return world_; }

 private:
  class Rank : public Collective {
   public:
    Rank(ThreadCollective* group, int rank) : group_(group), rank_(rank) {}
    int rank() const override { return rank_; }
    int size() const override { return group_->world_; }
    void AllReduceSum(double* data, int64_t n) override { group_->Sum(rank_, data, n); }
    void AllReduceSum(float* data, int64_t n) override { group_->Sum(rank_, data, n); }
    void AllGather(const double* in, int64_t n, double* out) override {
      group_->Meet(rank_, const_cast<double*>(in), [&](const std::vector<void*>& all) {
        for (int r = 0; r < group_->world_; ++r) {
          std::memcpy(out + r * n, all[r], sizeof(double) * n);
        }
      });
    }

   private:
    ThreadCollective* group_;
    int rank_;
  };

  template <typename T>
  void Sum(int rank, T* data, int64_t n) {
    std::vector<T> result;
    Meet(rank, data, [&](const std::vector<void*>& all) {
      result.assign(static_cast<T*>(all[0]), static_cast<T*>(all[0]) + n);
      for (int r = 1; r < world_; ++r) {
        const T* theirs = static_cast<T*>(all[r]);
        for (int64_t i = 0; i < n; ++i) result[i] += theirs[i];
      }
    });
    // Every rank computed the same sums in the same order; Meet's second barrier has made sure
    // every rank read every buffer before any writes its own back.
    std::copy(result.begin(), result.end(), data);
  }

  // Posts `mine`, waits for every rank, runs `read` over the posted buffers, and waits until
  // every rank has run it, so no buffer changes while another rank reads it.
  template <typename Read>
  void Meet(int rank, void* mine, Read read) {
    {
      std::unique_lock<std::mutex> lock(mu_);
      posted_[rank] = mine;
    }
    Barrier();
    read(posted_);
    Barrier();
  }

  void Barrier() {
    std::unique_lock<std::mutex> lock(mu_);
    const int64_t generation = generation_;
    if (++arrived_ == world_) {
      arrived_ = 0;
      ++generation_;
      cv_.notify_all();
      return;
    }
    cv_.wait(lock, [&] { return generation_ != generation; });
  }

  const int world_;
  std::vector<std::unique_ptr<Rank>> ranks_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<void*> posted_;  // GUARDED_BY(mu_) while posting; read between barriers
  int arrived_ = 0;            // GUARDED_BY(mu_)
  int64_t generation_ = 0;     // GUARDED_BY(mu_)
};

}  // namespace normd::testing

#endif  // NORMD_TESTS_CORE_THREAD_COLLECTIVE_H_
