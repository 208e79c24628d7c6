// The compute-thread budget: how many threads one core operation may use.
//
// normd's only multi-threaded kernels are Eigen's own matrix products (Linear, Conv2d), which
// Eigen parallelises with OpenMP when the library is built with it (core/CMakeLists.txt links
// OpenMP unless NORMD_OPENMP is off or the build uses TSan); every other kernel runs on the
// calling thread. When the products go to OpenBLAS (NORMD_BLAS and libopenblas-dev, the
// default where installed), OpenBLAS is kept single-threaded and every product runs on the
// calling thread whatever the budget: parallelism then comes from running requests side by
// side. The budget belongs to the calling thread and is 1 until that thread sets
// another, so nothing in the library starts threads unless a caller opts in. A caller running
// R operations at once on C cores gives each at most C / R threads so the total never exceeds
// the cores (a server with one compute thread per core keeps 1; one that runs a single model's
// steps at a time may give that thread every core). Without OpenMP the budget is always 1.
//
// Eigen's parallel products synchronise by spinning: on a machine whose cores are busy with
// other work a budget above 1 can be much slower than 1. Measure before raising it there.
//
// Thread safety: every function acts on the calling thread only.
#ifndef NORMD_CORE_THREADS_H_
#define NORMD_CORE_THREADS_H_

namespace normd {

// Sets the calling thread's budget (values below 1 mean 1). Returns the previous budget.
int SetComputeThreads(int threads);
// The calling thread's budget (1 without OpenMP).
int ComputeThreads();
// Whether the library was built with OpenMP (whether budgets above 1 have any effect).
bool ComputeThreadsAvailable();

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

namespace internal {
// Called by the layers before their matrix products: hands the calling thread's budget to
// OpenMP, whose own per-thread default would be every core.
void ApplyComputeThreads();
}  // namespace internal

}  // namespace normd

#endif  // NORMD_CORE_THREADS_H_
