#include "core/threads.h"

#include <algorithm>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace normd {
namespace {

thread_local int tl_budget = 1;

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
#ifdef _OPENMP
  // Eigen reads omp_get_max_threads() per product (normd never calls Eigen::setNbThreads).
  if (omp_get_max_threads() != tl_budget) omp_set_num_threads(tl_budget);
#endif
}

}  // namespace internal
}  // namespace normd
