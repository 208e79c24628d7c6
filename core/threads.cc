#include "core/threads.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>

#ifdef _OPENMP
#include <omp.h>
#endif

#ifdef NORMD_HAVE_OPENBLAS
extern "C" void openblas_set_num_threads(int num_threads);
#endif

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define NORMD_CPU_RELAX() _mm_pause()
#else
#define NORMD_CPU_RELAX() std::atomic_signal_fence(std::memory_order_seq_cst)
#endif

namespace normd {
namespace {

using Clock = std::chrono::steady_clock;

thread_local int tl_budget = 1;

#ifdef NORMD_HAVE_OPENBLAS
// OpenBLAS starts one thread per core and would use them all for every product, from every
// calling thread at once; normd's products run on the calling thread (and SplitInTwo's helper)
// instead. Its threads synchronise by spinning, which on busy cores costs far more than it gains
// (measured: a two-thread product on this 2-core VM under load ran several times slower than one).
struct OpenBlasSingleThreaded {
  OpenBlasSingleThreaded() { openblas_set_num_threads(1); }
};
#endif

// A split must not change a bit of the result (which would then depend on whether a core was
// idle): the caller picks where (SplitInTwo's align; kProductSplitAlign for products), and
// halves are never small (for products, that also keeps OpenBLAS off its small-matrix kernels).
// Halves of at least 2^21 multiply-adds (twice the measured floor): each takes >= ~15 us on a
// current core, against a hand-off of about a microsecond while the helper spins (tens when its
// core has to be woken).
constexpr int64_t kMinHalfWork = int64_t{1} << 21;
// How long the helper waits for the next half before it sleeps: the products of one training
// step follow each other within this, so the helper is awake for them, and it spins no longer
// than that after the last one.
constexpr auto kHelperSpin = std::chrono::microseconds(50);
// How long a caller that finished its half spins for the helper's before it sleeps.
constexpr auto kCallerSpin = std::chrono::microseconds(200);
// A split pays while the caller, done with its half, waits for the helper's for less than its
// own half took (the whole would have taken about two halves). When the helper is late (its
// core is busy with other processes, which the idle-core count cannot see) twice in a row, the
// next products are not split: kMinBackoff of them, twice as many after each further failed
// try up to kMaxBackoff (on a machine that stays busy, the tries then cost little), and back
// to kMinBackoff once a split pays again. Late means waiting longer than 0.9 of the caller's
// half, a margin for the hand-off. (At 0.5, the gRPC server's short waits while a send or the
// client held the second core counted as late: TrainStream at batch 1024 split 61-69 % of its
// products and ran 72-74 k samples/s; at 0.9, 78-95 % and 75-91 k.)
constexpr double kLateFraction = 0.9;
constexpr int kMinBackoff = 64;
constexpr int kMaxBackoff = 8192;

// Cores not held by a ScopedComputeCore or lent to the helper.
std::atomic<int>& IdleCores() {
  static std::atomic<int> idle{std::max(1, static_cast<int>(std::thread::hardware_concurrency()))};
  return idle;
}

bool TakeIdleCore() {
  std::atomic<int>& idle = IdleCores();
  int v = idle.load(std::memory_order_relaxed);
  while (v > 0) {
    if (idle.compare_exchange_weak(v, v - 1, std::memory_order_acq_rel)) return true;
  }
  return false;
}

void ReturnIdleCore() { IdleCores().fetch_add(1, std::memory_order_acq_rel); }

std::atomic<int64_t> splits_done{0};

// The helper thread: computes the second half of one split at a time. A half is either run by
// the helper (kPending -> kRunning -> kDone) or taken back by its caller (kPending -> kStolen)
// when the helper has not started it by the time the caller finished its own half.
class Helper {
 public:
  static Helper& Get() {
    static Helper* helper = new Helper();  // never destroyed: its thread runs until exit
    return *helper;
  }

  // One caller at a time; false when another split holds the helper.
  bool TryAcquire() { return !busy_.exchange(true, std::memory_order_acquire); }

  // Runs body(0, mid) here and body(mid, n) on the helper (or here, see above).
  // REQUIRES: TryAcquire() returned true. Releases the helper.
  void Run(const std::function<void(int64_t, int64_t)>& body, int64_t mid, int64_t n) {
    body_ = &body;
    begin_ = mid;
    end_ = n;
    {
      std::lock_guard<std::mutex> lock(mu_);
      state_.store(kPending, std::memory_order_release);
      ++generation_;
    }
    wake_.notify_one();
    const auto t0 = Clock::now();
    body(0, mid);
    const auto t1 = Clock::now();
    int expected = kPending;
    if (state_.compare_exchange_strong(expected, kStolen, std::memory_order_acq_rel)) {
      body(mid, n);
    } else {
      WaitDone();
    }
    const bool late = Clock::now() - t1 > kLateFraction * (t1 - t0);
    if (!late) {
      strikes_ = 0;
      next_backoff_ = kMinBackoff;
    } else if (++strikes_ >= 2) {
      strikes_ = 0;
      backoff_.store(next_backoff_, std::memory_order_relaxed);
      next_backoff_ = std::min(2 * next_backoff_, kMaxBackoff);
    }
    busy_.store(false, std::memory_order_release);
  }

  // True while splits are backed off (see kMinBackoff); counts the product down.
  bool BackingOff() {
    int v = backoff_.load(std::memory_order_relaxed);
    while (v > 0) {
      if (backoff_.compare_exchange_weak(v, v - 1, std::memory_order_relaxed)) return true;
    }
    return false;
  }

 private:
  enum State { kIdle, kPending, kRunning, kDone, kStolen };

  Helper() { std::thread([this] { Loop(); }).detach(); }

  void WaitDone() {
    const auto spin_until = Clock::now() + kCallerSpin;
    while (state_.load(std::memory_order_acquire) != kDone) {
      if (Clock::now() < spin_until) {
        NORMD_CPU_RELAX();
        continue;
      }
      std::unique_lock<std::mutex> lock(mu_);
      done_.wait(lock, [this] { return state_.load(std::memory_order_acquire) == kDone; });
    }
  }

  void Loop() {
    uint64_t seen = 0;
    for (;;) {
      const auto spin_until = Clock::now() + kHelperSpin;
      while (generation_.load(std::memory_order_acquire) == seen && Clock::now() < spin_until) {
        NORMD_CPU_RELAX();
      }
      {
        std::unique_lock<std::mutex> lock(mu_);
        wake_.wait(lock, [&] { return generation_.load(std::memory_order_relaxed) != seen; });
        seen = generation_.load(std::memory_order_relaxed);
      }
      // The fields are read only after the half is claimed: a caller does not return, and so
      // cannot post the next half, while its current one may still be claimed.
      int expected = kPending;
      if (!state_.compare_exchange_strong(expected, kRunning, std::memory_order_acq_rel)) {
        continue;  // taken back by its caller
      }
      (*body_)(begin_, end_);
      {
        std::lock_guard<std::mutex> lock(mu_);
        state_.store(kDone, std::memory_order_release);
      }
      done_.notify_one();
    }
  }

  std::atomic<bool> busy_{false};
  int strikes_ = 0;                 // consecutive late helpers; guarded by busy_
  int next_backoff_ = kMinBackoff;  // guarded by busy_
  std::atomic<int> backoff_{0};
  std::atomic<int> state_{kIdle};
  std::atomic<uint64_t> generation_{0};  // written under mu_, so waits cannot miss it
  // The posted half; written by the caller before state_ becomes kPending.
  const std::function<void(int64_t, int64_t)>* body_ = nullptr;
  int64_t begin_ = 0;
  int64_t end_ = 0;

  std::mutex mu_;
  std::condition_variable wake_;  // a half was posted
  std::condition_variable done_;  // the helper finished a half
};

}  // namespace

int SetComputeThreads(int threads) {
  const int previous = tl_budget;
  if (ComputeThreadsAvailable()) tl_budget = std::max(1, threads);
  return previous;
}

int ComputeThreads() { return tl_budget; }

bool ComputeThreadsAvailable() {
#if defined(_OPENMP) || defined(NORMD_HAVE_OPENBLAS)
  return true;
#else
  return false;
#endif
}

bool ComputeBorrowsIdleCores() {
#ifdef NORMD_HAVE_OPENBLAS
  return true;
#else
  return false;
#endif
}

ScopedComputeCore::ScopedComputeCore() { IdleCores().fetch_sub(1, std::memory_order_acq_rel); }

ScopedComputeCore::~ScopedComputeCore() { ReturnIdleCore(); }

void SplitInTwo(int64_t n, int64_t align, int64_t work,
                const std::function<void(int64_t, int64_t)>& body) {
  align = std::max<int64_t>(1, align);
  const int64_t mid = (n + align) / (2 * align) * align;  // the multiple nearest to n / 2
  const int64_t per_row = n > 0 ? work / n : 0;
  const bool split = ComputeBorrowsIdleCores() && tl_budget >= 2 && mid > 0 && mid < n &&
                     per_row * std::min(mid, n - mid) >= kMinHalfWork;
  if (!split || !TakeIdleCore()) {
    body(0, n);
    return;
  }
  Helper& helper = Helper::Get();
  if (helper.BackingOff() || !helper.TryAcquire()) {
    ReturnIdleCore();
    body(0, n);
    return;
  }
  helper.Run(body, mid, n);
  ReturnIdleCore();
  splits_done.fetch_add(1, std::memory_order_relaxed);
}

namespace internal {

void ApplyComputeThreads() {
#ifdef NORMD_HAVE_OPENBLAS
  static const OpenBlasSingleThreaded once;  // thread-safe one-time initialisation
  (void)once;
#ifdef _OPENMP
  // Products go to OpenBLAS; the budget is spent by SplitInTwo, not by OpenMP.
  if (omp_get_max_threads() != 1) omp_set_num_threads(1);
#endif
#elif defined(_OPENMP)
  // Eigen reads omp_get_max_threads() per product (normd never calls Eigen::setNbThreads).
  if (omp_get_max_threads() != tl_budget) omp_set_num_threads(tl_budget);
#endif
}

int64_t SplitsDone() { return splits_done.load(std::memory_order_relaxed); }

}  // namespace internal
}  // namespace normd
