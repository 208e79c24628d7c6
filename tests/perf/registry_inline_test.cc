// ModelEntry::TryRunInline (server/registry.h), the fast path of tiny requests: it runs a task
// on the calling thread only when the queue would have handed it to the pool at once, so FIFO
// order, shared/exclusive access and the per-model queue limit hold as for Schedule. Also the
// forward cost estimate that decides what counts as tiny.
#include <gtest/gtest.h>

#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

#include "server/registry.h"
#include "tests/server/gate.h"
#include "tests/server/normd_process.h"

namespace normd::server {
namespace {

using ::normd::testing::Gate;

using Access = ModelEntry::Access;
using Want = ModelEntry::Want;

class InlineTest : public ::testing::Test {
 protected:
  InlineTest() : pool_(2, 1) {}
  std::shared_ptr<ModelEntry> NewModel(const RegistryLimits& limits,
                                       const v1::ModelSpec& spec = testing::MlpSpec()) {
    registry_ = std::make_unique<Registry>(limits, &metrics_, &pool_);
    std::shared_ptr<ModelEntry> e;
    const Status s = registry_->Create(Principal(), "m", spec, &e);
    EXPECT_TRUE(s.ok()) << s.message();
    return e;
  }
  // Schedules a task that holds `want` until `release` opens; returns once it runs.
  void Hold(const std::shared_ptr<ModelEntry>& e, Want want, Gate* release) {
    Gate running;
    ASSERT_TRUE(e->Schedule(e, want, [&running, release](Access) {
                   running.Open();
                   release->Wait();
                 }).ok());
    running.Wait();
  }

  // Returns once every task scheduled before has finished (so no task still waits on a gate of
  // the test's).
  // Retries while the queue is full (its last task may not have left it yet).
  void Drain(const std::shared_ptr<ModelEntry>& e) {
    Gate done;
    Status s;
    for (int i = 0; i < 10000; ++i) {
      s = e->Schedule(e, Want::kExclusive, [&done](Access) { done.Open(); });
      if (s.code() != StatusCode::kResourceExhausted) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    ASSERT_TRUE(s.ok()) << s.message();
    done.Wait();
  }

  Metrics metrics_{"test"};
  ComputePool pool_;
  std::unique_ptr<Registry> registry_;
};

TEST_F(InlineTest, RunsOnTheCallingThreadWhenTheModelIsFree) {
  std::shared_ptr<ModelEntry> e = NewModel(RegistryLimits());
  std::thread::id ran_on;
  Access got = Access::kExclusive;
  ASSERT_TRUE(e->TryRunInline(e, Want::kShared, [&](Access a) {
    ran_on = std::this_thread::get_id();
    got = a;
  }));
  EXPECT_EQ(ran_on, std::this_thread::get_id());
  EXPECT_EQ(got, Access::kShared);
  // A new model trains: a forward by mode needs the model alone, and gets it when free.
  ASSERT_TRUE(e->TryRunInline(e, Want::kByMode, [&](Access a) { got = a; }));
  EXPECT_EQ(got, Access::kExclusive);
}

TEST_F(InlineTest, NeverOvertakesRunningOrQueuedWork) {
  std::shared_ptr<ModelEntry> e = NewModel(RegistryLimits());
  bool ran = false;
  auto task = [&ran](Access) { ran = true; };

  // An exclusive task running: neither a reader nor a writer may run beside it.
  Gate release_writer;
  Hold(e, Want::kExclusive, &release_writer);
  EXPECT_FALSE(e->TryRunInline(e, Want::kShared, task));
  EXPECT_FALSE(e->TryRunInline(e, Want::kExclusive, task));
  release_writer.Open();

  // A reader running: another reader may join it, a writer may not.
  Gate release_reader;
  Hold(e, Want::kShared, &release_reader);
  EXPECT_TRUE(e->TryRunInline(e, Want::kShared, task));
  EXPECT_TRUE(ran);
  ran = false;
  EXPECT_FALSE(e->TryRunInline(e, Want::kExclusive, task));
  // A writer queued behind the reader: a later reader waits its turn (FIFO) instead of
  // running inline ahead of it.
  Gate writer_ran;
  ASSERT_TRUE(e->Schedule(e, Want::kExclusive, [&writer_ran](Access) { writer_ran.Open(); }).ok());
  EXPECT_FALSE(e->TryRunInline(e, Want::kShared, task));
  EXPECT_FALSE(ran);
  release_reader.Open();
  writer_ran.Wait();
  Drain(e);
}

TEST_F(InlineTest, RespectsTheQueueLimit) {
  RegistryLimits limits;
  limits.max_queued_per_model = 1;
  std::shared_ptr<ModelEntry> e = NewModel(limits);
  Gate release;
  Hold(e, Want::kShared, &release);
  // One request in flight is the limit: Schedule refuses, and so must the inline path.
  bool ran = false;
  EXPECT_FALSE(e->TryRunInline(e, Want::kShared, [&ran](Access) { ran = true; }));
  EXPECT_EQ(e->Schedule(e, Want::kShared, [](Access) {}).code(), StatusCode::kResourceExhausted);
  EXPECT_FALSE(ran);
  release.Open();
  Drain(e);
}

TEST_F(InlineTest, ForwardCostCountsParametersAtEverySpatialPosition) {
  // MlpSpec(32, 64, 10): Linear 32->64, BatchNorm1d(64), ReLU, Linear 64->10.
  std::shared_ptr<ModelEntry> mlp = NewModel(RegistryLimits(), testing::MlpSpec(32, 64, 10));
  const int64_t params = (32 * 64 + 64) + 2 * 64 + (64 * 10 + 10);
  const int64_t outputs = 64 + 64 + 64 + 10;
  EXPECT_EQ(mlp->forward_cost_per_sample(), params + outputs);

  // Conv2d 3->8, k3, padding 1 on 3x16x16: 8 x 16 x 16 outputs, each 27 multiply-adds and a
  // bias, so the weights count once per position.
  v1::ModelSpec conv;
  for (int64_t d : {3, 16, 16}) conv.add_input_shape(d);
  v1::Conv2dSpec* c = conv.add_layers()->mutable_conv2d();
  c->set_in_channels(3);
  c->set_out_channels(8);
  c->set_kernel_size(3);
  c->set_padding(1);
  conv.set_loss(v1::LOSS_MSE);
  conv.mutable_optimizer()->mutable_sgd()->set_lr(0.1f);
  std::shared_ptr<ModelEntry> e = NewModel(RegistryLimits(), conv);
  const int64_t positions = 16 * 16;
  EXPECT_EQ(e->forward_cost_per_sample(), (8 * 27 + 8) * positions + 8 * positions);
}

}  // namespace
}  // namespace normd::server
