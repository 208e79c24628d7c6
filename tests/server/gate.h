// Gate: a one-shot gate that threads under test wait at until the test opens it, so a test
// controls what runs when without depending on the machine's speed. Wait gives up after
// `limit` (default 30 s), so a test that never opens a gate fails by its assertions instead
// of hanging.
//
// Thread safety: Open and Wait may be called from any thread.
#ifndef NORMD_TESTS_SERVER_GATE_H_
#define NORMD_TESTS_SERVER_GATE_H_

#include <chrono>
#include <condition_variable>
#include <mutex>

namespace normd::testing {

class Gate {
 public:
  void Open() {
    std::lock_guard<std::mutex> lock(mu_);
    open_ = true;
    cv_.notify_all();
  }
  // Returns whether the gate opened within `limit`.
  bool Wait(std::chrono::milliseconds limit = std::chrono::seconds(30)) {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, limit, [this] { return open_; });
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool open_ = false;
};

}  // namespace normd::testing

#endif  // NORMD_TESTS_SERVER_GATE_H_
