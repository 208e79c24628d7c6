// Tests of server/compute_pool: round-robin between tenants, the thread kept free for other
// tenants while more than one is active, and the compute budget a task gets. Tasks block on
// gates the test opens, so nothing depends on the machine's speed (waits are bounded by
// generous deadlines only).
#include "server/compute_pool.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <string>
#include <vector>

#include "core/threads.h"
#include "tests/server/gate.h"

namespace normd::server {
namespace {

using ::normd::testing::Gate;

using std::chrono::milliseconds;
using std::chrono::seconds;

// What ran, in order.
class Log {
 public:
  void Add(const std::string& what) {
    std::lock_guard<std::mutex> lock(mu_);
    entries_.push_back(what);
    cv_.notify_all();
  }
  // Waits until `n` entries are in (at most 30 s); returns them.
  std::vector<std::string> WaitFor(size_t n) {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait_for(lock, seconds(30), [&] { return entries_.size() >= n; });
    return entries_;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<std::string> entries_;
};

TEST(ComputePoolTest, QueuedTenantsAreServedRoundRobinNotFirstComeFirstServed) {
  Log log;
  Gate gate;
  {
    ComputePool pool(1, 1, seconds(60));
    // The only thread is held while the queue fills, so the order is the pool's choice.
    pool.Submit("x", [&] {
      gate.Wait();
      log.Add("x");
    });
    for (int i = 1; i <= 3; ++i) pool.Submit("a", [&log, i] { log.Add("a" + std::to_string(i)); });
    pool.Submit("b", [&] { log.Add("b1"); });
    pool.Submit("b", [&] { log.Add("b2"); });
    gate.Open();
    log.WaitFor(6);
  }  // the destructor runs whatever is left and joins
  // FIFO would have been x a1 a2 a3 b1 b2: a tenant with many tasks gets one turn per round.
  EXPECT_EQ(log.WaitFor(6), std::vector<std::string>({"x", "a1", "b1", "a2", "b2", "a3"}));
}

TEST(ComputePoolTest, ATenantLeavesAThreadForAnotherActiveTenant) {
  Log log;
  Gate a_gate;
  ComputePool pool(2, 1, seconds(60));
  // Tenant b was active (a request a moment ago): from now on a may hold one thread of two.
  pool.Submit("b", [&] { log.Add("b0"); });
  ASSERT_EQ(log.WaitFor(1).size(), 1u);
  for (int i = 1; i <= 3; ++i) {
    pool.Submit("a", [&, i] {
      log.Add("a" + std::to_string(i) + " started");
      a_gate.Wait();
    });
  }
  ASSERT_EQ(log.WaitFor(2).size(), 2u);  // a1 runs
  // a's flood holds one thread; b's next request runs on the other at once, while a1 still
  // blocks and a2, a3 wait.
  pool.Submit("b", [&] { log.Add("b1"); });
  const std::vector<std::string> seen = log.WaitFor(3);
  ASSERT_EQ(seen.size(), 3u);
  EXPECT_EQ(seen, std::vector<std::string>({"b0", "a1 started", "b1"}));
  a_gate.Open();
  EXPECT_EQ(log.WaitFor(5).size(), 5u);  // a2 and a3 run once a1 is done
}

TEST(ComputePoolTest, ASingleTenantUsesEveryThread) {
  Log log;
  Gate gate;
  ComputePool pool(2, 1, seconds(60));
  for (int i = 1; i <= 2; ++i) {
    pool.Submit("only", [&, i] {
      log.Add("t" + std::to_string(i));
      gate.Wait();
    });
  }
  // Both run at once: nobody else is active, so nothing is held back.
  EXPECT_EQ(log.WaitFor(2).size(), 2u);
  gate.Open();
}

TEST(ComputePoolTest, ATaskBorrowsIdleCoresOnlyWhileNoOtherTenantIsActive) {
  ComputePool pool(2, 1, seconds(60));
  // Where the build borrows idle cores, a lone tenant's task may compute on both; a task taken
  // while another tenant is active keeps to its own core, so the other's is free at once.
  const int alone = ComputeBorrowsIdleCores() ? 2 : 1;
  Log log;
  pool.Submit("a", [&] { log.Add("a " + std::to_string(ComputeThreads())); });
  ASSERT_EQ(log.WaitFor(1).size(), 1u);
  pool.Submit("b", [&] { log.Add("b " + std::to_string(ComputeThreads())); });
  pool.Submit("a", [&] { log.Add("a " + std::to_string(ComputeThreads())); });
  const std::vector<std::string> seen = log.WaitFor(3);
  ASSERT_EQ(seen.size(), 3u);
  EXPECT_EQ(seen[0], "a " + std::to_string(alone));
  // b and a are both active now (a submitted within the window): one core each, in any order.
  EXPECT_EQ(std::count(seen.begin() + 1, seen.end(), "b 1"), 1);
  EXPECT_EQ(std::count(seen.begin() + 1, seen.end(), "a 1"), 1);
}

}  // namespace
}  // namespace normd::server
