// A gtest fixture for suites that share one normd process (tests/server/normd_process.h).
#ifndef NORMD_TESTS_SERVER_SHARED_NORMD_TEST_H_
#define NORMD_TESTS_SERVER_SHARED_NORMD_TEST_H_

#include <gtest/gtest.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "tests/server/normd_process.h"

namespace normd::testing {

// The suite of `Derived` starts one normd in SetUpTestSuite with Derived::ServerFlags(), public
// (a Derived that declares none gets "--compute-threads=2"), and kills it in TearDownTestSuite.
// Each test gets a fresh stub_ on it; when the start failed, every test of the suite fails in
// SetUp with the start's error reported once by SetUpTestSuite. server_ is shared by the
// suite's tests (models they create stay until the suite ends): give them distinct ids.
template <typename Derived>
class SharedNormdTest : public ::testing::Test {
 public:
  static std::vector<std::string> ServerFlags() { return {"--compute-threads=2"}; }

 protected:
  static void SetUpTestSuite() {
    std::string error;
    server_ = NormdProcess::Start(Derived::ServerFlags(), &error).release();
    ASSERT_NE(server_, nullptr) << error;
  }
  static void TearDownTestSuite() {
    delete server_;
    server_ = nullptr;
  }
  void SetUp() override {
    ASSERT_NE(server_, nullptr);
    stub_ = server_->NewStub();
  }

  // The model's state_dict with the optimizer's entries, by name.
  std::map<std::string, std::vector<float>> State(const std::string& id) {
    v1::GetStateRequest req;
    req.set_model(id);
    req.set_include_optimizer(true);
    v1::ModelState st;
    const grpc::Status s = stub_->GetState(Ctx().get(), req, &st);
    EXPECT_TRUE(s.ok()) << s.error_message();
    return StateMap(st);
  }

  static inline NormdProcess* server_ = nullptr;
  std::unique_ptr<v1::Trainer::Stub> stub_;
};

}  // namespace normd::testing

#endif  // NORMD_TESTS_SERVER_SHARED_NORMD_TEST_H_
