// Unit tests of server/registry.h: model ids and limits, and ModelEntry's per-model queue (shared
// work runs together, exclusive work alone, FIFO, bounded), retained forwards.
#include "server/registry.h"

#include <gtest/gtest.h>

#include <condition_variable>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "tests/server/gate.h"
#include "tests/server/normd_process.h"

namespace normd::server {
namespace {

using ::normd::testing::Gate;

using Access = ModelEntry::Access;
using Want = ModelEntry::Want;

// Waits (bounded) until `n` parties arrived; false on timeout. Used to prove that tasks run at
// the same time without timing them.
class Rendezvous {
 public:
  explicit Rendezvous(int n) : n_(n) {}
  bool Arrive() {
    std::unique_lock<std::mutex> lock(mu_);
    if (++arrived_ >= n_) cv_.notify_all();
    return cv_.wait_for(lock, std::chrono::seconds(10), [this] { return arrived_ >= n_; });
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  int n_;
  int arrived_ = 0;
};

class RegistryTest : public ::testing::Test {
 protected:
  RegistryTest() : pool_(4, 1) {}
  std::shared_ptr<ModelEntry> NewModel(const std::string& id, const RegistryLimits& limits) {
    registry_ = std::make_unique<Registry>(limits, &metrics_, &pool_);
    std::shared_ptr<ModelEntry> e;
    const Status s = registry_->Create(Principal(), id, testing::MlpSpec(), &e);
    EXPECT_TRUE(s.ok()) << s.message();
    return e;
  }

  Metrics metrics_{"test"};
  ComputePool pool_;
  std::unique_ptr<Registry> registry_;
};

TEST_F(RegistryTest, SharedTasksRunTogetherExclusiveAlone) {
  std::shared_ptr<ModelEntry> e = NewModel("m", RegistryLimits());
  std::mutex mu;
  int active = 0;
  bool overlap_with_exclusive = false;
  std::vector<std::string> order;
  Rendezvous all_readers(3);
  std::atomic<int> met{0};
  Gate done;
  std::atomic<int> finished{0};
  auto shared = [&](const std::string& name) {
    return [&, name](Access a) {
      EXPECT_EQ(a, Access::kShared);
      {
        std::lock_guard<std::mutex> lock(mu);
        ++active;
        order.push_back(name);
      }
      if (name.rfind("r", 0) == 0 && all_readers.Arrive()) ++met;
      {
        std::lock_guard<std::mutex> lock(mu);
        --active;
      }
      if (++finished == 6) done.Open();
    };
  };
  auto exclusive = [&](const std::string& name) {
    return [&, name](Access a) {
      EXPECT_EQ(a, Access::kExclusive);
      {
        std::lock_guard<std::mutex> lock(mu);
        overlap_with_exclusive = overlap_with_exclusive || active != 0;
        order.push_back(name);
      }
      if (++finished == 6) done.Open();
    };
  };
  // Three readers (which can only all pass the rendezvous if they run at once), a writer, then
  // two more readers that must wait for the writer.
  ASSERT_TRUE(e->Schedule(e, Want::kShared, shared("r1")).ok());
  ASSERT_TRUE(e->Schedule(e, Want::kShared, shared("r2")).ok());
  ASSERT_TRUE(e->Schedule(e, Want::kShared, shared("r3")).ok());
  ASSERT_TRUE(e->Schedule(e, Want::kExclusive, exclusive("w")).ok());
  ASSERT_TRUE(e->Schedule(e, Want::kShared, shared("s4")).ok());
  ASSERT_TRUE(e->Schedule(e, Want::kShared, shared("s5")).ok());
  done.Wait();
  EXPECT_EQ(finished.load(), 6);
  EXPECT_EQ(met.load(), 3);  // the three readers overlapped
  EXPECT_FALSE(overlap_with_exclusive);
  std::lock_guard<std::mutex> lock(mu);
  ASSERT_EQ(order.size(), 6u);
  EXPECT_EQ(order[3], "w");  // FIFO: after the three readers, before the later two
}

TEST_F(RegistryTest, ForwardAccessFollowsTheMode) {
  std::shared_ptr<ModelEntry> e = NewModel("m", RegistryLimits());
  Gate done;
  Access seen = Access::kShared;
  ASSERT_TRUE(e->Schedule(e, Want::kByMode, [&](Access a) {
    seen = a;
    done.Open();
  }).ok());
  done.Wait();
  EXPECT_EQ(seen, Access::kExclusive);  // new models train: a forward writes

  Gate switched;
  ASSERT_TRUE(e->Schedule(e, Want::kExclusive, [&](Access) {
    std::unique_lock<std::shared_mutex> lock(e->mu());
    e->model().SetMode(false, false);
    e->Publish();
    switched.Open();
  }).ok());
  switched.Wait();
  Gate done2;
  ASSERT_TRUE(e->Schedule(e, Want::kByMode, [&](Access a) {
    seen = a;
    done2.Open();
  }).ok());
  done2.Wait();
  EXPECT_EQ(seen, Access::kShared);
}

TEST_F(RegistryTest, QueueIsBounded) {
  RegistryLimits limits;
  limits.max_queued_per_model = 2;
  std::shared_ptr<ModelEntry> e = NewModel("m", limits);
  Gate release, all_done;
  std::atomic<int> ran{0};
  ASSERT_TRUE(e->Schedule(e, Want::kExclusive, [&](Access) {
    release.Wait();
    ++ran;
  }).ok());
  ASSERT_TRUE(e->Schedule(e, Want::kExclusive, [&](Access) {
    if (++ran == 2) all_done.Open();
  }).ok());
  const Status refused = e->Schedule(e, Want::kShared, [&](Access) { ++ran; });
  EXPECT_EQ(refused.code(), StatusCode::kResourceExhausted);
  EXPECT_NE(refused.message().find("limit is 2"), std::string::npos) << refused.message();
  release.Open();
  all_done.Wait();
  EXPECT_EQ(ran.load(), 2);
}

// A model's next task runs on the thread that finished its previous one when nothing else waits
// for the pool (no hand-off, see ModelEntry::DoneAndTakeNext)...
TEST_F(RegistryTest, NextTaskOfAModelStaysOnItsThread) {
  std::shared_ptr<ModelEntry> e = NewModel("m", RegistryLimits());
  for (int round = 0; round < 20; ++round) {
    Gate release, done;
    std::thread::id first, second;
    ASSERT_TRUE(e->Schedule(e, Want::kExclusive, [&](Access) {
      release.Wait();
      first = std::this_thread::get_id();
    }).ok());
    ASSERT_TRUE(e->Schedule(e, Want::kExclusive, [&](Access) {
      second = std::this_thread::get_id();
      done.Open();
    }).ok());
    release.Open();
    done.Wait();
    ASSERT_EQ(first, second) << "round " << round;
  }
}

// ...but not ahead of other work waiting for the pool: with one pool thread, another model's task
// queued while a model's tasks run comes next, in the pool's FIFO order.
TEST(RegistrySchedulingTest, OtherModelsWorkIsNotHeldBack) {
  Metrics metrics("test");
  ComputePool pool(1, 1);
  Registry registry(RegistryLimits(), &metrics, &pool);
  std::shared_ptr<ModelEntry> a, b;
  ASSERT_TRUE(registry.Create(Principal(), "a", testing::MlpSpec(), &a).ok());
  ASSERT_TRUE(registry.Create(Principal(), "b", testing::MlpSpec(), &b).ok());
  std::mutex mu;
  std::vector<std::string> order;
  Gate started, release, done;
  auto record = [&](const std::string& name) {
    std::lock_guard<std::mutex> lock(mu);
    order.push_back(name);
    if (order.size() == 4) done.Open();
  };
  ASSERT_TRUE(a->Schedule(a, Want::kExclusive, [&](Access) {
    started.Open();
    release.Wait();
    record("a1");
  }).ok());
  started.Wait();  // a1 holds the only thread
  ASSERT_TRUE(a->Schedule(a, Want::kExclusive, [&](Access) { record("a2"); }).ok());
  ASSERT_TRUE(a->Schedule(a, Want::kExclusive, [&](Access) { record("a3"); }).ok());
  ASSERT_TRUE(b->Schedule(b, Want::kExclusive, [&](Access) { record("b1"); }).ok());
  release.Open();
  done.Wait();
  std::lock_guard<std::mutex> lock(mu);
  EXPECT_EQ(order, (std::vector<std::string>{"a1", "b1", "a2", "a3"}));
}

TEST_F(RegistryTest, RetainedForwardsBoundedAndExplained) {
  RegistryLimits limits;
  limits.max_retained_forwards = 2;
  std::shared_ptr<ModelEntry> e = NewModel("m", limits);
  ASSERT_TRUE(e->ReserveRetained().ok());
  const uint64_t a = e->CommitRetained(std::make_unique<ForwardRecord>());
  ASSERT_TRUE(e->ReserveRetained().ok());
  EXPECT_EQ(e->ReserveRetained().code(), StatusCode::kResourceExhausted);
  e->CancelReservation();
  ASSERT_TRUE(e->ReserveRetained().ok());
  const uint64_t b = e->CommitRetained(std::make_unique<ForwardRecord>());
  EXPECT_NE(a, b);
  std::unique_ptr<ForwardRecord> rec;
  ASSERT_TRUE(e->TakeRetained(a, &rec).ok());
  e->NoteReleased(a, "released by its Backward");
  Status s = e->TakeRetained(a, &rec);
  EXPECT_EQ(s.code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(s.message().find("released by its Backward"), std::string::npos);
  s = e->TakeRetained(b + 100, &rec);
  EXPECT_NE(s.message().find("unknown"), std::string::npos) << s.message();
  e->ReleaseAllRetained("released by SetState");
  s = e->TakeRetained(b, &rec);
  EXPECT_NE(s.message().find("released by SetState"), std::string::npos) << s.message();
  EXPECT_EQ(e->retained_count(), 0);
}

TEST_F(RegistryTest, CreateLimitsAndIds) {
  RegistryLimits limits;
  limits.max_models = 2;
  Registry registry(limits, &metrics_, &pool_);
  std::shared_ptr<ModelEntry> e;
  ASSERT_TRUE(registry.Create(Principal(), "", testing::MlpSpec(), &e).ok());
  EXPECT_EQ(e->id().rfind("m-", 0), 0u);
  EXPECT_EQ(registry.Create(Principal(), e->id(), testing::MlpSpec(), &e).code(), StatusCode::kAlreadyExists);
  ASSERT_TRUE(registry.Create(Principal(), "two", testing::MlpSpec(), &e).ok());
  EXPECT_EQ(registry.Create(Principal(), "three", testing::MlpSpec(), &e).code(),
            StatusCode::kResourceExhausted);
  EXPECT_EQ(registry.size(), 2);
  std::shared_ptr<ModelEntry> found;
  EXPECT_EQ(registry.Find(Principal(), "nope", &found).code(), StatusCode::kNotFound);
  EXPECT_EQ(registry.Find(Principal(), "../x", &found).code(), StatusCode::kInvalidArgument);
  ASSERT_TRUE(registry.Find(Principal(), "two", &found).ok());
  {
    std::unique_lock<std::shared_mutex> lock(found->mu());
    ASSERT_TRUE(registry.Remove(*found).ok());
  }
  EXPECT_TRUE(found->deleted());
  EXPECT_EQ(registry.size(), 1);
  ASSERT_TRUE(registry.Create(Principal(), "three", testing::MlpSpec(), &e).ok());
  // The model gauge and the deleted model's series follow.
  const std::string text = metrics_.Render();
  EXPECT_EQ(testing::MetricValue(text, "normd_models"), 2.0);
  EXPECT_EQ(text.find("model=\"two\""), std::string::npos);
  EXPECT_NE(text.find("model=\"three\""), std::string::npos);
}

}  // namespace
}  // namespace normd::server
