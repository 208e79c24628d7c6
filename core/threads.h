// The compute-thread budget: how many cores one core operation may use, and the two-way split
// of large matrix products that spends a budget of 2.
//
// The budget belongs to the calling thread and is 1 until that thread sets another, so nothing
// in the library uses a second core unless a caller opts in.
//
// How a budget above 1 is spent depends on the build:
//  - With OpenBLAS (NORMD_BLAS and libopenblas-dev, the default where installed), OpenBLAS is
//    kept single-threaded (its threads synchronise by spinning, which on busy cores costs more
//    than it gains) and the layers split their large products in two (SplitInTwo): one half on
//    the calling thread, the other on a helper thread that waits on a condition variable. The
//    helper borrows a core only while one is idle (see ScopedComputeCore), so a caller may give
//    every compute thread a budget of all its cores: one request running alone then uses two
//    cores, two requests at once one each, and threads never outnumber cores.
//  - Without OpenBLAS, Eigen parallelises its own products with OpenMP when the library is built
//    with it (NORMD_OPENMP). OpenMP's threads do not borrow idle cores, so a caller running R
//    operations at once on C cores gives each at most C / R threads. Eigen's parallel products
//    synchronise by spinning too: on busy cores a budget above 1 can be much slower than 1.
//
// Results do not depend on the budget or on whether a core was idle: an operation split in two
// computes every output element in the same order as the whole (see SplitInTwo,
// kProductSplitAlign).
//
// Thread safety: the budget functions act on the calling thread only; SplitInTwo and
// ScopedComputeCore may be used from any thread.
#ifndef NORMD_CORE_THREADS_H_
#define NORMD_CORE_THREADS_H_

#include <cstdint>
#include <functional>

namespace normd {

// Sets the calling thread's budget (values below 1 mean 1). Returns the previous budget.
int SetComputeThreads(int threads);
// The calling thread's budget (1 when the build has no way to use more, see
// ComputeThreadsAvailable).
int ComputeThreads();
// Whether budgets above 1 have any effect (OpenBLAS or OpenMP builds).
bool ComputeThreadsAvailable();
// Whether a budget above 1 is spent by borrowing idle cores (OpenBLAS builds, see above), so it
// may be given to every compute thread at once.
bool ComputeBorrowsIdleCores();

// Sets the calling thread's budget for a scope and restores the previous one.
class ScopedComputeThreads {
 public:
  explicit ScopedComputeThreads(int threads) : previous_(SetComputeThreads(threads)) {}
  ~ScopedComputeThreads() { SetComputeThreads(previous_); }
  ScopedComputeThreads(const ScopedComputeThreads&) = delete;
  ScopedComputeThreads& operator=(const ScopedComputeThreads&) = delete;

 private:
  int previous_;
};

// Marks one of the process's cores busy for a scope: a thread holds one while it computes a
// request (the server's ComputePool does), so SplitInTwo's helper never takes a core another
// compute thread is using. The process has std::thread::hardware_concurrency() cores.
class ScopedComputeCore {
 public:
  ScopedComputeCore();
  ~ScopedComputeCore();
  ScopedComputeCore(const ScopedComputeCore&) = delete;
  ScopedComputeCore& operator=(const ScopedComputeCore&) = delete;
};

// Runs body(0, n) on the calling thread, or, when `work` (the operation's cost in multiply-adds
// of a matrix product, spread evenly over the n rows) is large, the calling thread's budget is
// at least 2, the build splits (see ComputeBorrowsIdleCores) and a core is idle, body(0, m) on
// the calling thread and body(m, n) on the helper thread at once, m the multiple of `align`
// nearest to n / 2. Returns when all of [0, n) is done. If the helper has not started its half
// when the caller has finished its own, the caller runs it too; and while the helper keeps
// finishing late (its core busy with other processes) nothing is split for a while.
// REQUIRES: body(a, b) and body(b, c) write disjoint memory; body does not call SplitInTwo;
// body(0, n) computes the same bits as body(0, m) and body(m, n) together.
void SplitInTwo(int64_t n, int64_t align, int64_t work,
                const std::function<void(int64_t, int64_t)>& body);

// What one element of a memory-bound pass (BatchNorm, pooling, a bias gradient) counts for in
// SplitInTwo's `work` (which is in multiply-adds of a matrix product): with 4, a pass splits
// from 2^20 elements on. Smaller passes stay on one core: their halves take tens of
// microseconds, the two halves share the L3 bandwidth, and a half that ends late makes
// SplitInTwo back off for the next 64+ operations, the large products of the same step
// included. Measured with BatchNorm on the reference MLP, budget 2, quiet 2-core machine: when
// (256, 512) layers split (at the former weight of 64), only 1.1-1.3 of the step's 5 large
// products split and it ran 63-65 k samples/s; since, 4.4-4.9 split and it runs 95-98 k.
// (1024, 512) layers gained nothing from splitting either (96-106 k samples/s either way).
constexpr int64_t kSplitWorkPerElement = 4;

// The `align` that keeps an OpenBLAS product split by rows of its output bit-identical to the
// whole product (with SplitInTwo's size floor): OpenBLAS computes every output element in the
// same order whatever the other dimensions are, except in the tiles at the edges of the output
// and for small products (other kernels). Measured over 1220 shapes each, splits at multiples of
// 48 with halves of >= 2^20 multiply-adds gave identical bits with the Sandybridge, Haswell, Zen,
// SkylakeX and Cooperlake kernels; splits at other multiples (16, 32, 64, 128), of smaller
// products or along the other output dimension did not with some of them (tests/perf checks
// the layers' products).
constexpr int64_t kProductSplitAlign = 48;

namespace internal {
// Called by the layers before their matrix products: hands the calling thread's budget to
// OpenMP in builds without OpenBLAS (OpenMP's own per-thread default would be every core).
void ApplyComputeThreads();
// How many SplitInTwo calls ran split so far (tests check that a split happened).
int64_t SplitsDone();
}  // namespace internal

}  // namespace normd

#endif  // NORMD_CORE_THREADS_H_
