// MpiCollective: the core's Collective (core/collective.h) over MPI, for data-parallel jobs
// started with `mpirun -np N`. Every operation is one MPI collective on a communicator of its
// own (a duplicate of MPI_COMM_WORLD), so the job's other messages never mix with the model's.
//
// Sums use MPI_Allreduce with MPI_SUM. A started sum (StartAllReduceSum: a gradient bucket
// whose layers the backward pass has finished) is one too, completed before the call returns:
// Open MPI 4.1 moves a non-blocking MPI_Iallreduce only inside MPI calls (no progress thread
// for its shared-memory and TCP transports), so it cannot travel while a layer computes, and
// its schedule was measured slower: the reference MLP's 2.6 MiB of gradients per step cost
// rank 0 1.47 ms in collectives with MPI_Iallreduce against 0.85 ms with MPI_Allreduce (a
// 2-rank job on this machine, batch 256). The buckets still sum each part of the gradient as
// soon as it is final, in few large messages, between the backward pass's layers. The MPI standard leaves the order of a reduction to the
// implementation and only advises that every rank get the same result; Open MPI's algorithms
// (recursive doubling, ring with a final all-gather, reduce + broadcast) give every rank the same
// bits, which tests/mpi checks by comparing the replicas bit for bit after training.
//
// Lifetime: MpiSession initialises MPI (once per process) and finalises it when destroyed;
// MpiCollective objects must not outlive it. Thread safety: MPI is initialised with
// MPI_THREAD_SERIALIZED (several threads may call MPI, never two at once); one thread per rank
// uses a collective at a time, as the core's contract says.
#ifndef NORMD_MPI_MPI_COLLECTIVE_H_
#define NORMD_MPI_MPI_COLLECTIVE_H_

#include <mpi.h>

#include <cstdint>
#include <memory>

#include "core/collective.h"
#include "core/status.h"

namespace normd::mpi {

// Whether this process was started by an MPI launcher (Open MPI's mpirun sets
// OMPI_COMM_WORLD_SIZE; PMIx launchers PMIX_RANK). A normd started without one never touches
// MPI, so the plain binary needs no launcher.
bool LaunchedByMpi();

class MpiSession {
 public:
  // Initialises MPI with MPI_THREAD_SERIALIZED; an error when MPI fails or grants less.
  static Status Start(std::unique_ptr<MpiSession>* out);
  ~MpiSession();
  MpiSession(const MpiSession&) = delete;
  MpiSession& operator=(const MpiSession&) = delete;

  int rank() const { return rank_; }
  int size() const { return size_; }

 private:
  MpiSession(int rank, int size) : rank_(rank), size_(size) {}
  int rank_;
  int size_;
};

class MpiCollective : public Collective {
 public:
  // REQUIRES: an MpiSession is alive. Collective over every rank of the job: every rank must
  // construct its MpiCollective at the same point of its program (MPI_Comm_dup is collective).
  MpiCollective();
  ~MpiCollective() override;
  MpiCollective(const MpiCollective&) = delete;
  MpiCollective& operator=(const MpiCollective&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  void AllReduceSum(double* data, int64_t n) override;
  void AllReduceSum(float* data, int64_t n) override;
  void AllGather(const double* in, int64_t n, double* out) override;
  void StartAllReduceSum(float* data, int64_t n) override;

  MPI_Comm comm() const { return comm_; }

 private:
  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0;
  int size_ = 1;
};

}  // namespace normd::mpi

#endif  // NORMD_MPI_MPI_COLLECTIVE_H_
