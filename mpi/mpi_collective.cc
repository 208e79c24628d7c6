#include "mpi/mpi_collective.h"

#include <climits>
#include <cstdlib>

namespace normd::mpi {
namespace {

// MPI counts are ints: large buffers go in pieces of at most this many elements.
constexpr int64_t kMaxCount = INT_MAX / 2;

}  // namespace

bool LaunchedByMpi() {
  return std::getenv("OMPI_COMM_WORLD_SIZE") != nullptr || std::getenv("PMIX_RANK") != nullptr;
}

Status MpiSession::Start(std::unique_ptr<MpiSession>* out) {
  int provided = 0;
  if (MPI_Init_thread(nullptr, nullptr, MPI_THREAD_SERIALIZED, &provided) != MPI_SUCCESS) {
    return Status(StatusCode::kUnavailable, "MPI_Init_thread failed");
  }
  if (provided < MPI_THREAD_SERIALIZED) {
    MPI_Finalize();
    return Status(StatusCode::kUnavailable,
                  StrCat("the MPI library grants thread level ", provided,
                         ", below MPI_THREAD_SERIALIZED"));
  }
  int rank = 0, size = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  out->reset(new MpiSession(rank, size));
  return Status::Ok();
}

MpiSession::~MpiSession() { MPI_Finalize(); }

MpiCollective::MpiCollective() {
  MPI_Comm_dup(MPI_COMM_WORLD, &comm_);
  MPI_Comm_rank(comm_, &rank_);
  MPI_Comm_size(comm_, &size_);
}

MpiCollective::~MpiCollective() {
  if (comm_ != MPI_COMM_NULL) MPI_Comm_free(&comm_);
}

void MpiCollective::AllReduceSum(double* data, int64_t n) {
  for (int64_t done = 0; done < n; done += kMaxCount) {
    const int count = static_cast<int>(n - done < kMaxCount ? n - done : kMaxCount);
    MPI_Allreduce(MPI_IN_PLACE, data + done, count, MPI_DOUBLE, MPI_SUM, comm_);
  }
}

void MpiCollective::AllReduceSum(float* data, int64_t n) {
  for (int64_t done = 0; done < n; done += kMaxCount) {
    const int count = static_cast<int>(n - done < kMaxCount ? n - done : kMaxCount);
    MPI_Allreduce(MPI_IN_PLACE, data + done, count, MPI_FLOAT, MPI_SUM, comm_);
  }
}

void MpiCollective::StartAllReduceSum(float* data, int64_t n) {
  // Completes the sum now, with the blocking MPI_Allreduce (see the header).
  AllReduceSum(data, n);
}

void MpiCollective::AllGather(const double* in, int64_t n, double* out) {
  // The core gathers small per-channel statistics; one call suffices below 2^30 values.
  MPI_Allgather(in, static_cast<int>(n), MPI_DOUBLE, out, static_cast<int>(n), MPI_DOUBLE,
                comm_);
}

}  // namespace normd::mpi
