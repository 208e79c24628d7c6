#include "core/threads.h"

#include <algorithm>

#ifdef _OPENMP
#include <omp.h>
#endif

#ifdef NORMD_HAVE_OPENBLAS
extern "C" void openblas_set_num_threads(int num_threads);
#endif

namespace normd {
namespace {

thread_local int tl_budget = 1;

#ifdef NORMD_HAVE_OPENBLAS
// OpenBLAS starts one thread per core and would use them all for every product, from every
// calling thread at once; normd's products run on the calling thread instead. Its threads
// synchronise by spinning, which on busy cores costs far more than it gains (measured: a
// two-thread product on this 2-core VM under load ran several times slower than one).
struct OpenBlasSingleThreaded {
  OpenBlasSingleThreaded() { openblas_set_num_threads(1); }
};
#endif

}  // namespace

int SetComputeThreads(int threads) {
  const int previous = tl_budget;
#ifdef _OPENMP
  tl_budget = std::max(1, threads);
#else
  (void)threads;
#endif
  return previous;
}

int ComputeThreads() { return tl_budget; }

bool ComputeThreadsAvailable() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

namespace internal {

void ApplyComputeThreads() {
#ifdef NORMD_HAVE_OPENBLAS
  static const OpenBlasSingleThreaded once;  // thread-safe one-time initialisation
  (void)once;
#endif
#ifdef _OPENMP
  // Eigen reads omp_get_max_threads() per product (normd never calls Eigen::setNbThreads).
  if (omp_get_max_threads() != tl_budget) omp_set_num_threads(tl_budget);
#endif
}

}  // namespace internal
}  // namespace normd
