#include "server/mpi_job.h"

#include <climits>
#include <cstdint>

namespace normd::server {
namespace {

// MPI counts are ints: large messages go in pieces.
constexpr uint64_t kPiece = INT_MAX / 2;

}  // namespace

MpiJobChannel::MpiJobChannel() {
  MPI_Comm_dup(MPI_COMM_WORLD, &comm_);
  MPI_Comm_rank(comm_, &rank_);
  MPI_Comm_size(comm_, &size_);
}

MpiJobChannel::~MpiJobChannel() {
  if (comm_ != MPI_COMM_NULL) MPI_Comm_free(&comm_);
}

void MpiJobChannel::Broadcast(std::string* bytes) {
  uint64_t n = rank_ == 0 ? bytes->size() : 0;
  MPI_Bcast(&n, 1, MPI_UINT64_T, 0, comm_);
  if (rank_ != 0) bytes->resize(n);
  for (uint64_t done = 0; done < n; done += kPiece) {
    const int count = static_cast<int>(n - done < kPiece ? n - done : kPiece);
    MPI_Bcast(bytes->data() + done, count, MPI_BYTE, 0, comm_);
  }
}

void MpiJobChannel::Gather(const std::string& mine, std::vector<std::string>* all) {
  // Shards of one batch: each part stays far below 2 GiB (the batch limit), so one Gatherv.
  int n = static_cast<int>(mine.size());
  std::vector<int> counts(rank_ == 0 ? size_ : 0);
  MPI_Gather(&n, 1, MPI_INT, counts.data(), 1, MPI_INT, 0, comm_);
  std::vector<int> offsets(counts.size());
  std::string joined;
  if (rank_ == 0) {
    int64_t total = 0;
    for (int r = 0; r < size_; ++r) {
      offsets[r] = static_cast<int>(total);
      total += counts[r];
    }
    joined.resize(total);
  }
  MPI_Gatherv(mine.data(), n, MPI_BYTE, joined.data(), counts.data(), offsets.data(), MPI_BYTE, 0,
              comm_);
  if (rank_ == 0) {
    all->assign(size_, std::string());
    for (int r = 0; r < size_; ++r) (*all)[r] = joined.substr(offsets[r], counts[r]);
  }
}

}  // namespace normd::server
