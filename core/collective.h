// Collective: the data-parallel seam. A model trained by N processes keeps one replica per
// process ("rank"); each rank computes on its own shard of every batch, and whatever mixes the
// samples of a batch (BatchNorm's batch statistics and their gradient sums, the loss's mean,
// the parameter gradients) is combined across ranks through a Collective, so the job computes
// what one process computes on the whole batch (SyncBatchNorm). The core knows no transport:
// the server implements this interface over MPI (outside core/), tests implement it with threads.
//
// Contract for implementations: every rank calls the same operations, in the same order, with
// the same sizes; each call returns on a rank once every rank has made it. Results are the same
// bits on every rank (an operation that combined in a rank-dependent order would let replicas
// drift apart). Sums combine rank 0's values, then rank 1's, ... when the implementation can
// promise an order; what the core needs is only that every rank gets the same bits.
//
// Non-blocking sums (StartAllReduceSum ... WaitAll) let a rank go on computing while its
// gradients travel (core/gradient_buckets.h). They count as operations in the order above: every
// rank starts the same ones in the same order, interleaved the same way with blocking calls.
//
// Thread safety: one thread per rank calls a Collective at a time (the model it serves is
// exclusively held while it trains).
#ifndef NORMD_CORE_COLLECTIVE_H_
#define NORMD_CORE_COLLECTIVE_H_

#include <cstdint>

namespace normd {

class Collective {
 public:
  virtual ~Collective() = default;

  virtual int rank() const = 0;
  virtual int size() const = 0;

  // data[i] = the sum over ranks of every rank's data[i], for i in [0, n).
  virtual void AllReduceSum(double* data, int64_t n) = 0;
  virtual void AllReduceSum(float* data, int64_t n) = 0;
  // out[r * n + i] = rank r's in[i]: every rank's n values, in rank order.
  // REQUIRES: out holds size() * n values and does not overlap in.
  virtual void AllGather(const double* in, int64_t n, double* out) = 0;

  // Starts AllReduceSum(data, n) and may return before it completes: data must not be read or
  // written until WaitAll returns, and then holds the sums. Blocking calls may be made while
  // started sums are pending. The default completes the sum before returning.
  virtual void StartAllReduceSum(float* data, int64_t n) { AllReduceSum(data, n); }
  // Lets pending sums advance without waiting for them (MPI moves a non-blocking collective
  // only inside MPI calls). The default has nothing pending.
  virtual void Progress() {}
  // Returns once every started sum has completed.
  virtual void WaitAll() {}
};

// Where one rank's rows sit in a data-parallel batch. A default-constructed shard is "not
// data-parallel": the rank holds the whole batch and combines nothing.
struct DataParallelShard {
  Collective* collective = nullptr;  // not owned; outlives every use of the shard
  int64_t global_rows = 0;           // rows of the whole batch, over every rank
  int64_t row_offset = 0;            // this rank's first row in the whole batch

  bool active() const { return collective != nullptr; }
};

// The contiguous shard of rank `rank` of `world` over a batch of `rows` rows: sizes differ by
// at most one, the larger shards first (rows 257 over 3 ranks: 86, 86, 85; rows 2 over 3: 1,
// 1, 0). Returns the shard's row count and sets *offset to its first row.
inline int64_t ShardRows(int64_t rows, int world, int rank, int64_t* offset) {
  const int64_t base = rows / world;
  const int64_t extra = rows % world;
  *offset = rank * base + (rank < extra ? rank : extra);
  return base + (rank < extra ? 1 : 0);
}

}  // namespace normd

#endif  // NORMD_CORE_COLLECTIVE_H_
