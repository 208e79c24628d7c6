// Data-parallel training over real MPI (mpi/mpi_collective.h): run as `mpirun -np N` (ctest
// runs 2 and 3 ranks, over shared memory and over TCP). Every rank trains its replica on its
// shard of each batch; every rank also trains one model on the whole batch (deterministic, so
// all ranks hold the same reference). After training the replicas must be bit-identical across
// ranks (compared through MPI) and equal the reference up to the order of floating-point sums:
// the same cases as tests/core/data_parallel_test.cc's threads, over the transport jobs use.
#include <gtest/gtest.h>
#include <mpi.h>

#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "core/collective.h"
#include "core/model.h"
#include "mpi/mpi_collective.h"
#include "tests/core/data_parallel_cases.h"

namespace normd {
namespace {

using namespace ::normd::testing;  // NOLINT: the shared cases and helpers

mpi::MpiCollective* g_collective = nullptr;

// Every rank's state values, concatenated; true when every rank's equal rank 0's bit for bit.
bool SameOnEveryRank(const std::vector<NamedTensor>& state) {
  std::vector<float> mine;
  for (const NamedTensor& t : state) mine.insert(mine.end(), t.values.begin(), t.values.end());
  const int world = g_collective->size();
  std::vector<float> all(mine.size() * world);
  MPI_Allgather(mine.data(), static_cast<int>(mine.size()), MPI_FLOAT, all.data(),
                static_cast<int>(mine.size()), MPI_FLOAT, g_collective->comm());
  for (int r = 1; r < world; ++r) {
    if (std::memcmp(all.data(), all.data() + r * mine.size(), mine.size() * sizeof(float)) != 0) {
      return false;
    }
  }
  return true;
}

DataParallelShard ShardOf(int64_t rows, int64_t* n) {
  DataParallelShard shard{g_collective, rows, 0};
  *n = ShardRows(rows, g_collective->size(), g_collective->rank(), &shard.row_offset);
  return shard;
}

void TrainStepsMatch(const ModelConfig& config, int64_t rows, int steps) {
  SCOPED_TRACE("rows " + std::to_string(rows) + ", rank " + std::to_string(g_collective->rank()));
  std::unique_ptr<Model> single = Build(config);
  std::unique_ptr<Model> replica = Build(config);
  for (int step = 0; step < steps; ++step) {
    const Batch batch = MakeBatch(config, rows, 100 + step);
    ForwardRecord rec, scratch;
    TrainResult expected, got;
    ASSERT_TRUE(single->TrainStep(batch.x.view(), TargetsOf(batch, 0, rows), &rec, &expected).ok());
    int64_t n = 0;
    const DataParallelShard shard = ShardOf(rows, &n);
    const Status s = replica->TrainStep(Rows(batch.x, shard.row_offset, n),
                                        TargetsOf(batch, shard.row_offset, n), &scratch, &got,
                                        shard);
    ASSERT_TRUE(s.ok()) << s.message();
    EXPECT_EQ(got.step, expected.step);
    EXPECT_EQ(got.learning_rate, expected.learning_rate);
    EXPECT_NEAR(got.grad_norm, expected.grad_norm, 1e-5 * (1.0 + expected.grad_norm));
    EXPECT_NEAR(got.loss, expected.loss, 1e-5 * (1.0 + std::abs(expected.loss))) << "step " << step;
  }
  EXPECT_TRUE(SameOnEveryRank(replica->GetState(true))) << "the replicas differ";
  ExpectClose(replica->GetState(true), single->GetState(true), 2e-5, 2e-4, "after training");
}

TEST(MpiDataParallelTest, MlpWithDropoutUnevenShards) { TrainStepsMatch(Mlp(), 257, 20); }

TEST(MpiDataParallelTest, TrainingRecipe) { TrainStepsMatch(MlpWithRecipe(), 100, 20); }

TEST(MpiDataParallelTest, MoreRanksThanRows) { TrainStepsMatch(Mlp(), 2, 10); }

TEST(MpiDataParallelTest, CnnWithCumulativeBatchNorm2dAndAdam) { TrainStepsMatch(Cnn(), 37, 20); }

TEST(MpiDataParallelTest, ResidualBlock) { TrainStepsMatch(ResidualCnn(), 29, 20); }

TEST(MpiDataParallelTest, NoAffineNoTrackingMse) { TrainStepsMatch(NoAffineNoTracking(), 50, 20); }

TEST(MpiDataParallelTest, ForwardBackwardApplyGradients) {
  const ModelConfig config = Cnn();
  const int64_t rows = 17;
  std::unique_ptr<Model> single = Build(config);
  std::unique_ptr<Model> replica = Build(config);
  for (int step = 0; step < 5; ++step) {
    const Batch batch = MakeBatch(config, rows, 40 + step);
    ForwardRecord rec, scratch;
    ASSERT_TRUE(single->Forward(batch.x.view(), &rec).ok());
    Tensor grad_output, grad_input, shard_dx;
    ComputeLoss(config.loss, rec.output().view(), TargetsOf(batch, 0, rows), &grad_output);
    ASSERT_TRUE(single->Backward(&rec, grad_output.view(), &grad_input).ok());
    StepResult expected_step, got_step;
    ASSERT_TRUE(single->ApplyGradients(&expected_step).ok());
    int64_t n = 0;
    const DataParallelShard shard = ShardOf(rows, &n);
    ASSERT_TRUE(replica->Forward(Rows(batch.x, shard.row_offset, n), &scratch, shard).ok());
    ASSERT_TRUE(
        replica->Backward(&scratch, Rows(grad_output, shard.row_offset, n), &shard_dx).ok());
    ASSERT_TRUE(replica->ApplyGradients(&got_step, g_collective).ok());
    EXPECT_EQ(got_step.step, expected_step.step);
    EXPECT_NEAR(got_step.grad_norm, expected_step.grad_norm, 1e-5 * (1.0 + expected_step.grad_norm));
    const int64_t per_row = grad_input.view().shape.DropFirst().NumElements();
    for (int64_t i = 0; i < shard_dx.size(); ++i) {
      EXPECT_NEAR(shard_dx.data()[i], grad_input.data()[shard.row_offset * per_row + i], 1e-6);
    }
  }
  EXPECT_TRUE(SameOnEveryRank(replica->GetState(true))) << "the replicas differ";
  ExpectClose(replica->GetState(true), single->GetState(true), 2e-5, 2e-4, "after 5 steps");
}

}  // namespace
}  // namespace normd

int main(int argc, char** argv) {
  std::unique_ptr<normd::mpi::MpiSession> session;
  const normd::Status s = normd::mpi::MpiSession::Start(&session);
  if (!s.ok()) {
    std::fprintf(stderr, "%s\n", s.message().c_str());
    return 2;
  }
  ::testing::InitGoogleTest(&argc, argv);
  int result = 0;
  {
    normd::mpi::MpiCollective collective;
    normd::g_collective = &collective;
    // Rank 0 prints the results; the others only their failures.
    if (session->rank() != 0) {
      ::testing::TestEventListeners& listeners = ::testing::UnitTest::GetInstance()->listeners();
      delete listeners.Release(listeners.default_result_printer());
    }
    result = RUN_ALL_TESTS();
    // The job fails when any rank failed.
    MPI_Allreduce(MPI_IN_PLACE, &result, 1, MPI_INT, MPI_MAX, collective.comm());
    normd::g_collective = nullptr;
  }
  return result;
}
