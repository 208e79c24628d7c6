// The service's fast paths (issue 7) keep the contract of server/service.h: TrainStream reads
// ahead of the step in progress, yet answers in order, applies the steps in order, and runs no
// message after the first that failed, whichever model it names. Runs the real normd binary.
#include <gtest/gtest.h>

#include <memory>
#include <string>
#include <vector>

#include "tests/server/normd_process.h"
#include "tests/server/shared_normd_test.h"

namespace normd::testing {
namespace {

using grpc::StatusCode;

constexpr int kIn = 32;
constexpr int kOut = 10;

class ServiceFastPathTest : public SharedNormdTest<ServiceFastPathTest> {
 protected:
  void Create(const std::string& id, uint64_t seed = 1) {
    v1::CreateModelRequest req;
    req.set_id(id);
    *req.mutable_spec() = MlpSpec(kIn, 64, kOut, seed);
    v1::Model m;
    const grpc::Status s = stub_->CreateModel(Ctx().get(), req, &m);
    ASSERT_TRUE(s.ok()) << s.error_message();
  }

  uint64_t Step(const std::string& id) {
    v1::GetModelRequest req;
    req.set_model(id);
    v1::Model m;
    const grpc::Status s = stub_->GetModel(Ctx().get(), req, &m);
    EXPECT_TRUE(s.ok()) << s.error_message();
    return m.step();
  }


  // Message i of a run: its own batch, raw or values encoded.
  static v1::TrainStepRequest Message(const std::string& model, int i, int batch = 16) {
    v1::TrainStepRequest req;
    req.set_model(model);
    *req.mutable_input() = MakeTensor(
        {batch, kIn}, RandomValues(static_cast<size_t>(batch) * kIn, 1000 + i), i % 2 == 0);
    const std::vector<int64_t> labels = RandomLabels(batch, kOut, 2000 + i);
    *req.mutable_labels() = {labels.begin(), labels.end()};
    return req;
  }

  // Writes every message before reading any answer (so the server always has the next one to
  // read ahead), then half-closes. Returns the answers and the final status.
  grpc::Status RunStream(const std::vector<v1::TrainStepRequest>& messages,
                         std::vector<v1::TrainStepResponse>* answers) {
    auto ctx = Ctx();
    auto stream = stub_->TrainStream(ctx.get());
    for (const v1::TrainStepRequest& m : messages) {
      if (!stream->Write(m)) break;  // the server has ended the stream
    }
    stream->WritesDone();
    v1::TrainStepResponse resp;
    while (stream->Read(&resp)) answers->push_back(resp);
    return stream->Finish();
  }
};

TEST_F(ServiceFastPathTest, StreamAppliesEveryStepInOrderLikeUnaryCalls) {
  // Two models with the same seed: one trained over a stream, one by unary calls. Read-ahead
  // must neither reorder steps nor let a step see another message's batch.
  Create("ra-stream", 7);
  Create("ra-unary", 7);
  constexpr int kSteps = 40;
  std::vector<v1::TrainStepRequest> messages;
  for (int i = 0; i < kSteps; ++i) messages.push_back(Message("ra-stream", i, 8 + i % 5));
  std::vector<v1::TrainStepResponse> answers;
  const grpc::Status s = RunStream(messages, &answers);
  ASSERT_TRUE(s.ok()) << s.error_message();
  ASSERT_EQ(answers.size(), static_cast<size_t>(kSteps));
  for (int i = 0; i < kSteps; ++i) {
    v1::TrainStepRequest unary = messages[i];
    unary.set_model("ra-unary");
    v1::TrainStepResponse r;
    const grpc::Status us = stub_->TrainStep(Ctx().get(), unary, &r);
    ASSERT_TRUE(us.ok()) << us.error_message();
    EXPECT_EQ(answers[i].step(), static_cast<uint64_t>(i + 1));
    EXPECT_EQ(answers[i].samples(), 8 + i % 5);
    EXPECT_EQ(answers[i].loss(), r.loss()) << "step " << i + 1;
  }
  const auto a = State("ra-stream");
  const auto b = State("ra-unary");
  ASSERT_EQ(a.size(), b.size());
  for (const auto& [name, values] : a) {
    ASSERT_EQ(b.count(name), 1u) << name;
    EXPECT_TRUE(BitEqual(values, b.at(name))) << name;
  }
}

TEST_F(ServiceFastPathTest, StreamRunsNothingAfterAComputeErrorEvenOnAnotherModel) {
  Create("ra-a");
  Create("ra-b");
  std::vector<v1::TrainStepRequest> messages = {Message("ra-a", 0, 256), Message("ra-a", 1),
                                                Message("ra-b", 2), Message("ra-b", 3)};
  messages[1].set_labels(3, kOut);  // out of range: the core refuses it when the step runs
  std::vector<v1::TrainStepResponse> answers;
  const grpc::Status s = RunStream(messages, &answers);
  EXPECT_EQ(s.error_code(), StatusCode::INVALID_ARGUMENT) << s.error_message();
  ASSERT_EQ(answers.size(), 1u);
  EXPECT_EQ(answers[0].step(), 1u);
  EXPECT_EQ(Step("ra-a"), 1u);
  EXPECT_EQ(Step("ra-b"), 0u);  // read ahead, perhaps, but never run
}

TEST_F(ServiceFastPathTest, StreamAnswersEarlierMessagesBeforeADecodeError) {
  // The second message fails to decode (on a gRPC thread) while the first is still computing:
  // the first is answered, then the stream ends with the second's error.
  Create("ra-c");
  std::vector<v1::TrainStepRequest> messages = {Message("ra-c", 0, 512), Message("ra-c", 1),
                                                Message("ra-c", 2)};
  messages[1].clear_input();
  std::vector<v1::TrainStepResponse> answers;
  grpc::Status s = RunStream(messages, &answers);
  EXPECT_EQ(s.error_code(), StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(s.error_message().find("input is required"), std::string::npos) << s.error_message();
  ASSERT_EQ(answers.size(), 1u);
  EXPECT_EQ(Step("ra-c"), 1u);

  // An unknown model after two good messages: two answers, then NOT_FOUND.
  messages = {Message("ra-c", 3, 512), Message("ra-c", 4), Message("ra-missing", 5),
              Message("ra-c", 6)};
  answers.clear();
  s = RunStream(messages, &answers);
  EXPECT_EQ(s.error_code(), StatusCode::NOT_FOUND) << s.error_message();
  ASSERT_EQ(answers.size(), 2u);
  EXPECT_EQ(answers[1].step(), 3u);
  EXPECT_EQ(Step("ra-c"), 3u);
}

TEST_F(ServiceFastPathTest, StreamCancelledMidwayLeavesTheServerServing) {
  Create("ra-d");
  {
    auto ctx = Ctx();
    auto stream = stub_->TrainStream(ctx.get());
    for (int i = 0; i < 6; ++i) ASSERT_TRUE(stream->Write(Message("ra-d", i, 256)));
    v1::TrainStepResponse resp;
    ASSERT_TRUE(stream->Read(&resp));
    ctx->TryCancel();
    EXPECT_EQ(stream->Finish().error_code(), StatusCode::CANCELLED);
  }
  // Whatever ran, ran whole and in order (at least the answered step, at most all six), and
  // the model still trains.
  std::vector<v1::TrainStepResponse> answers;
  const grpc::Status s = RunStream({Message("ra-d", 10)}, &answers);
  ASSERT_TRUE(s.ok()) << s.error_message();
  ASSERT_EQ(answers.size(), 1u);
  EXPECT_GE(answers[0].step(), 2u);
  EXPECT_LE(answers[0].step(), 7u);
}

}  // namespace
}  // namespace normd::testing
