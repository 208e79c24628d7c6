// The MPI side of a data-parallel job (server/data_parallel.h), linked into the normd binary
// only: the server library and the core know no MPI.
//
// MpiJobChannel: the job's commands on a communicator of their own (a duplicate of
// MPI_COMM_WORLD), apart from the models' collectives (mpi::MpiCollective, another duplicate),
// so a command never matches a model's message. Broadcast is a broadcast of the size (polled,
// with sleeps, on the workers, which would otherwise spin a core while idle) then the bytes;
// Gather is MPI_Gather of the sizes then MPI_Gatherv of the bytes to rank 0; Scatter is
// MPI_Scatterv of byte ranges from rank 0 (whose own range stays in place).
//
// Thread safety: MPI runs at MPI_THREAD_SERIALIZED; rank 0 calls the channel and the collective
// only under the job's mutex, so one thread at a time.
#ifndef NORMD_SERVER_MPI_JOB_H_
#define NORMD_SERVER_MPI_JOB_H_

#include <mpi.h>

#include <memory>
#include <string>
#include <vector>

#include "mpi/mpi_collective.h"
#include "server/data_parallel.h"

namespace normd::server {

class MpiJobChannel final : public JobChannel {
 public:
  // REQUIRES: an MpiSession is alive. Collective over every rank (communicator duplicates).
  MpiJobChannel();
  ~MpiJobChannel() override;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  void Broadcast(std::string* bytes) override;
  void Gather(const std::string& mine, std::vector<std::string>* all) override;
  void Scatter(const void* data, const std::vector<int64_t>& counts,
               const std::vector<int64_t>& offsets, void* out, int64_t bytes) override;
  Collective* collective() override { return &collective_; }

 private:
  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0;
  int size_ = 1;
  mpi::MpiCollective collective_;
};

}  // namespace normd::server

#endif  // NORMD_SERVER_MPI_JOB_H_
