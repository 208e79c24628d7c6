// Data-parallel training in the core (core/collective.h, Model's shard arguments): N replicas,
// one thread per rank over a ThreadCollective, each given its shard of every batch, against one
// model given the whole batch. The replicas must end bit-identical to each other and equal the
// single model up to the order of floating-point sums: SyncBatchNorm statistics and running
// statistics, the whole batch's loss and gradients with unequal and empty shards, Dropout
// masks, a global non-finite refusal.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "core/collective.h"
#include "core/model.h"
#include "core/rng.h"
#include "tests/core/data_parallel_cases.h"
#include "tests/core/thread_collective.h"

namespace normd {
namespace {

using namespace ::normd::testing;  // NOLINT: the shared cases and helpers

// Rank r's shard of a batch of `rows` rows over `group`; *n: its row count.
DataParallelShard ShardOf(ThreadCollective* group, int r, int64_t rows, int64_t* n) {
  DataParallelShard shard{group->rank(r), rows, 0};
  *n = ShardRows(rows, group->size(), r, &shard.row_offset);
  return shard;
}

// Runs body(rank) on one thread per rank and waits for all.
void OnEveryRank(int world, const std::function<void(int)>& body) {
  std::vector<std::thread> threads;
  for (int r = 0; r < world; ++r) threads.emplace_back(body, r);
  for (std::thread& t : threads) t.join();
}

// Trains `steps` TrainSteps on batches of `rows` rows: one model on the whole batch, and a job
// of `world` replicas on shards. Compares losses each step, then the replicas with each other
// (bits) and with the single model (tolerance).
// *largest_grad_norm (when given): the largest gradient norm a step reported.
void TrainStepsMatch(const ModelConfig& config, int world, int64_t rows, int steps, bool eval_too,
                     double* largest_grad_norm = nullptr) {
  const double atol = 2e-5, rtol = 2e-4;
  SCOPED_TRACE("world " + std::to_string(world) + ", rows " + std::to_string(rows));
  std::unique_ptr<Model> single = Build(config);
  std::vector<std::unique_ptr<Model>> replicas;
  for (int r = 0; r < world; ++r) replicas.push_back(Build(config));
  ThreadCollective group(world);
  for (int step = 0; step < steps; ++step) {
    const Batch batch = MakeBatch(config, rows, 100 + step);
    ForwardRecord rec;
    TrainResult expected;
    ASSERT_TRUE(single->TrainStep(batch.x.view(), TargetsOf(batch, 0, rows), &rec, &expected).ok());
    std::vector<TrainResult> got(world);
    std::vector<Status> status(world);
    OnEveryRank(world, [&](int r) {
      int64_t n = 0;
      const DataParallelShard shard = ShardOf(&group, r, rows, &n);
      ForwardRecord scratch;
      status[r] = replicas[r]->TrainStep(Rows(batch.x, shard.row_offset, n),
                                         TargetsOf(batch, shard.row_offset, n), &scratch, &got[r],
                                         shard);
    });
    for (int r = 0; r < world; ++r) {
      ASSERT_TRUE(status[r].ok()) << "rank " << r << ": " << status[r].message();
      EXPECT_EQ(got[r].loss, got[0].loss) << "rank " << r;  // the same bits everywhere
      EXPECT_EQ(got[r].step, expected.step);
      EXPECT_EQ(got[r].samples, rows);
      EXPECT_EQ(got[r].grad_norm, got[0].grad_norm) << "rank " << r;
      EXPECT_EQ(got[r].learning_rate, expected.learning_rate);
    }
    EXPECT_NEAR(got[0].grad_norm, expected.grad_norm, 1e-5 * (1.0 + expected.grad_norm));
    if (largest_grad_norm != nullptr) {
      *largest_grad_norm = std::max(*largest_grad_norm, got[0].grad_norm);
    }
    EXPECT_NEAR(got[0].loss, expected.loss, 1e-5 * (1.0 + std::abs(expected.loss)))
        << "step " << step;
  }
  for (int r = 1; r < world; ++r) {
    ExpectBitIdentical(replicas[r]->GetState(true), replicas[0]->GetState(true),
                       "rank " + std::to_string(r));
  }
  ExpectClose(replicas[0]->GetState(true), single->GetState(true), atol, rtol, "after training");
  if (eval_too) {
    const Batch batch = MakeBatch(config, rows, 999);
    ForwardRecord rec;
    EvalResult expected;
    ASSERT_TRUE(single->Evaluate(batch.x.view(), TargetsOf(batch, 0, rows), &rec, &expected).ok());
    std::vector<EvalResult> got(world);
    OnEveryRank(world, [&](int r) {
      int64_t n = 0;
      const DataParallelShard shard = ShardOf(&group, r, rows, &n);
      ForwardRecord scratch;
      EXPECT_TRUE(replicas[r]
                      ->Evaluate(Rows(batch.x, shard.row_offset, n),
                                 TargetsOf(batch, shard.row_offset, n), &scratch, &got[r], shard)
                      .ok());
    });
    for (int r = 0; r < world; ++r) {
      EXPECT_NEAR(got[r].loss, expected.loss, 1e-5 * (1.0 + std::abs(expected.loss)));
      EXPECT_EQ(got[r].accuracy, expected.accuracy);
      EXPECT_EQ(got[r].samples, rows);
    }
  }
}

TEST(ShardRowsTest, ContiguousSizesWithinOneLargerFirst) {
  int64_t offset = -1;
  EXPECT_EQ(ShardRows(257, 3, 0, &offset), 86);
  EXPECT_EQ(offset, 0);
  EXPECT_EQ(ShardRows(257, 3, 1, &offset), 86);
  EXPECT_EQ(offset, 86);
  EXPECT_EQ(ShardRows(257, 3, 2, &offset), 85);
  EXPECT_EQ(offset, 172);
  EXPECT_EQ(ShardRows(2, 3, 1, &offset), 1);
  EXPECT_EQ(offset, 1);
  EXPECT_EQ(ShardRows(2, 3, 2, &offset), 0);
  EXPECT_EQ(offset, 2);
}

TEST(DataParallelTest, MlpWithDropoutMatchesOneProcessWithUnequalShards) {
  TrainStepsMatch(Mlp(), 3, 257, 20, /*eval_too=*/true);
  TrainStepsMatch(Mlp(), 2, 64, 20, /*eval_too=*/true);
}

TEST(DataParallelTest, TrainingRecipeClipsTheWholeBatchsGradient) {
  double largest = 0.0;
  TrainStepsMatch(MlpWithRecipe(), 3, 100, 20, /*eval_too=*/true, &largest);
  EXPECT_GT(largest, MlpWithRecipe().optimizer.max_grad_norm);  // the clipping did act
}

TEST(DataParallelTest, EmptyShardsWhenRanksOutnumberRows) {
  TrainStepsMatch(Mlp(), 3, 2, 10, /*eval_too=*/true);
  TrainStepsMatch(Mlp(), 4, 3, 10, /*eval_too=*/false);
}

TEST(DataParallelTest, CnnWithCumulativeBatchNorm2dAndAdam) {
  TrainStepsMatch(Cnn(), 3, 37, 20, /*eval_too=*/true);
  TrainStepsMatch(Cnn(), 2, 2, 5, /*eval_too=*/false);
}

TEST(DataParallelTest, ResidualBlockWithBatchNormInBothBranches) {
  TrainStepsMatch(ResidualCnn(), 3, 29, 20, /*eval_too=*/true);
}

TEST(DataParallelTest, NoAffineAndNoRunningStatisticsWithMse) {
  TrainStepsMatch(NoAffineNoTracking(), 3, 50, 20, /*eval_too=*/true);
}

// The running statistics the replicas commit are the whole batch's (unbiased variance over the
// whole batch's count), after one step exactly as after twenty.
TEST(DataParallelTest, RunningStatisticsAreTheWholeBatchs) {
  const ModelConfig config = Mlp();
  std::unique_ptr<Model> single = Build(config);
  const int world = 3;
  std::vector<std::unique_ptr<Model>> replicas;
  for (int r = 0; r < world; ++r) replicas.push_back(Build(config));
  ThreadCollective group(world);
  const Batch batch = MakeBatch(config, 10, 5);
  ForwardRecord rec;
  ASSERT_TRUE(single->Forward(batch.x.view(), &rec).ok());
  OnEveryRank(world, [&](int r) {
    int64_t n = 0;
    const DataParallelShard shard = ShardOf(&group, r, 10, &n);
    ForwardRecord scratch;
    EXPECT_TRUE(replicas[r]->Forward(Rows(batch.x, shard.row_offset, n), &scratch, shard).ok());
  });
  const BatchNorm* expected = single->net().node(1).layer->AsBatchNorm();
  for (int r = 0; r < world; ++r) {
    const BatchNorm* got = replicas[r]->net().node(1).layer->AsBatchNorm();
    EXPECT_EQ(got->num_batches_tracked(), 1);
    for (int64_t c = 0; c < 16; ++c) {
      EXPECT_NEAR(got->running_mean().data()[c], expected->running_mean().data()[c], 1e-6);
      EXPECT_NEAR(got->running_var().data()[c], expected->running_var().data()[c], 1e-6);
    }
  }
}

// The drift figures (BatchNormDrift) of a sharded forward are the whole batch's on every rank,
// also where running statistics normalise and SyncBatchNorm has nothing to combine for the
// normalisation: an eval-mode forward (a retained one runs on every rank of a job) and a
// train-mode forward through a frozen layer.
TEST(DataParallelTest, DriftIsTheWholeBatchsWhenRunningStatisticsNormalise) {
  const ModelConfig config = Mlp();
  const int world = 3;
  const int64_t rows = 10;
  for (const bool eval : {true, false}) {
    SCOPED_TRACE(eval ? "eval mode" : "train mode, BatchNorm frozen");
    std::unique_ptr<Model> single = Build(config);
    std::vector<std::unique_ptr<Model>> replicas;
    for (int r = 0; r < world; ++r) replicas.push_back(Build(config));
    for (Model* m : {single.get(), replicas[0].get(), replicas[1].get(), replicas[2].get()}) {
      if (eval) {
        m->SetMode(/*training=*/false, /*freeze_running_stats=*/false);
      } else {
        bool changed = false;
        ASSERT_TRUE(m->SetLayerOptions({{"1", true, std::nullopt}}, &changed).ok());
      }
    }
    ThreadCollective group(world);
    // Shifted and scaled inputs: the drift against the initial running statistics is large,
    // and each shard's differs from the whole batch's.
    Batch batch = MakeBatch(config, rows, 9);
    for (int64_t i = 0; i < batch.x.size(); ++i) {
      batch.x.data()[i] = batch.x.data()[i] * (1.0f + 0.3f * (i % 7)) + 0.1f * i;
    }
    ForwardRecord rec;
    ASSERT_TRUE(single->Forward(batch.x.view(), &rec).ok());
    ASSERT_EQ(rec.batch_norms().size(), 1u);
    const BatchNormDrift want = rec.batch_norms()[0].drift;
    ASSERT_TRUE(want.valid);
    std::vector<BatchNormDrift> got(world);
    OnEveryRank(world, [&](int r) {
      int64_t n = 0;
      const DataParallelShard shard = ShardOf(&group, r, rows, &n);
      ForwardRecord scratch;
      ASSERT_TRUE(replicas[r]->Forward(Rows(batch.x, shard.row_offset, n), &scratch, shard).ok());
      got[r] = scratch.batch_norms()[0].drift;
    });
    // Each rank's figure is the whole batch's (not necessarily the same bits on every rank:
    // the sum over channels is vectorised by the scratch area's alignment; only rank 0's is
    // reported, and no state depends on it).
    for (int r = 0; r < world; ++r) {
      EXPECT_TRUE(got[r].valid);
      EXPECT_NEAR(got[r].mean_shift, want.mean_shift, 1e-9 * (1.0 + want.mean_shift))
          << "rank " << r;
      EXPECT_NEAR(got[r].var_log_ratio, want.var_log_ratio, 1e-9 * (1.0 + want.var_log_ratio))
          << "rank " << r;
    }
    // The running statistics stay as they were: nothing was normalised by the batch.
    for (int r = 0; r < world; ++r) {
      const BatchNorm* bn = replicas[r]->net().node(1).layer->AsBatchNorm();
      EXPECT_EQ(bn->num_batches_tracked(), 0) << "rank " << r;
    }
  }
}

// Forward + Backward + ApplyGradients with the output gradient split like the input: the
// shards' input gradients put together are the whole batch's, and the step is the same.
TEST(DataParallelTest, ForwardBackwardApplyGradientsMatchOneProcess) {
  const ModelConfig config = Cnn();
  const int world = 3;
  const int64_t rows = 17;
  std::unique_ptr<Model> single = Build(config);
  std::vector<std::unique_ptr<Model>> replicas;
  for (int r = 0; r < world; ++r) replicas.push_back(Build(config));
  ThreadCollective group(world);
  for (int step = 0; step < 5; ++step) {
    const Batch batch = MakeBatch(config, rows, 40 + step);
    ForwardRecord rec;
    ASSERT_TRUE(single->Forward(batch.x.view(), &rec).ok());
    Tensor grad_output, grad_input;
    ComputeLoss(config.loss, rec.output().view(), TargetsOf(batch, 0, rows), &grad_output);
    ASSERT_TRUE(single->Backward(&rec, grad_output.view(), &grad_input).ok());
    StepResult expected_step;
    ASSERT_TRUE(single->ApplyGradients(&expected_step).ok());

    std::vector<Tensor> shard_dx(world);
    std::vector<StepResult> steps(world);
    OnEveryRank(world, [&](int r) {
      int64_t n = 0;
      const DataParallelShard shard = ShardOf(&group, r, rows, &n);
      ForwardRecord scratch;
      ASSERT_TRUE(replicas[r]->Forward(Rows(batch.x, shard.row_offset, n), &scratch, shard).ok());
      ASSERT_TRUE(replicas[r]
                      ->Backward(&scratch, Rows(grad_output, shard.row_offset, n), &shard_dx[r])
                      .ok());
      ASSERT_TRUE(replicas[r]->ApplyGradients(&steps[r], group.rank(r)).ok());
    });
    const int64_t per_row = grad_input.view().shape.DropFirst().NumElements();
    int64_t row = 0;
    for (int r = 0; r < world; ++r) {
      EXPECT_EQ(steps[r].step, expected_step.step);
      EXPECT_EQ(steps[r].grad_norm, steps[0].grad_norm);
      EXPECT_NEAR(steps[r].grad_norm, expected_step.grad_norm, 1e-5 * (1.0 + expected_step.grad_norm));
      for (int64_t i = 0; i < shard_dx[r].size(); ++i) {
        EXPECT_NEAR(shard_dx[r].data()[i], grad_input.data()[row * per_row + i], 1e-6)
            << "rank " << r << " element " << i;
      }
      row += shard_dx[r].size() / per_row;
    }
    EXPECT_EQ(row, rows);
  }
  for (int r = 1; r < world; ++r) {
    ExpectBitIdentical(replicas[r]->GetState(true), replicas[0]->GetState(true),
                       "rank " + std::to_string(r));
  }
  ExpectClose(replicas[0]->GetState(true), single->GetState(true), 2e-5, 2e-4, "after 5 steps");
}

// Gradients that overflow on one rank only (its rows of the output gradient are huge) make the
// whole batch's non-finite: every rank refuses the step, and no replica changes.
TEST(DataParallelTest, ANonFiniteShardStopsEveryRank) {
  const ModelConfig config = Mlp();
  const int world = 3;
  std::vector<std::unique_ptr<Model>> replicas;
  for (int r = 0; r < world; ++r) replicas.push_back(Build(config));
  ThreadCollective group(world);
  const Batch batch = MakeBatch(config, 12, 1);
  Tensor grad_output(Shape{12, 3}, 0.01f);
  // The last rank's rows: finite, but the weight gradient they make (3e38 times activations of
  // order 1) overflows.
  for (int64_t i = 8 * 3; i < 12 * 3; ++i) grad_output.data()[i] = 3e38f;
  std::vector<std::vector<NamedTensor>> before(world);
  std::vector<Status> status(world);
  OnEveryRank(world, [&](int r) {
    int64_t n = 0;
    const DataParallelShard shard = ShardOf(&group, r, 12, &n);
    ForwardRecord scratch;
    ASSERT_TRUE(replicas[r]->Forward(Rows(batch.x, shard.row_offset, n), &scratch, shard).ok());
    before[r] = replicas[r]->GetState(true);
    ASSERT_TRUE(
        replicas[r]->Backward(&scratch, Rows(grad_output, shard.row_offset, n), nullptr).ok());
    StepResult step;
    status[r] = replicas[r]->ApplyGradients(&step, group.rank(r));
  });
  for (int r = 0; r < world; ++r) {
    EXPECT_EQ(status[r].code(), StatusCode::kFailedPrecondition) << "rank " << r;
    EXPECT_NE(status[r].message().find("non-finite gradients"), std::string::npos);
    EXPECT_EQ(replicas[r]->step(), 0u);
    ExpectBitIdentical(replicas[r]->GetState(true), before[r], "rank " + std::to_string(r));
    ExpectBitIdentical(replicas[r]->GetState(true), replicas[0]->GetState(true),
                       "rank " + std::to_string(r) + " against rank 0");
  }
}

// BatchNorm's one-value-per-channel rule is about the whole batch: a shard of one row is fine
// when the batch has more, and a batch of one row is refused on every rank.
TEST(DataParallelTest, OneValuePerChannelRuleUsesTheWholeBatch) {
  std::unique_ptr<Model> m = Build(Mlp());
  ThreadCollective group(1);
  const Batch batch = MakeBatch(Mlp(), 1, 2);
  DataParallelShard whole_of_two{group.rank(0), 2, 0};
  EXPECT_TRUE(m->CheckInput(batch.x.view(), true, whole_of_two).ok());
  DataParallelShard whole_of_one{group.rank(0), 1, 0};
  const Status s = m->CheckInput(batch.x.view(), true, whole_of_one);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("Expected more than 1 value per channel"), std::string::npos);
}

}  // namespace
}  // namespace normd
