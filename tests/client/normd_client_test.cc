// Tests of client/normd_client.{h,cc} that need no normd: the wire encoding of tensors, the
// error type, the local failures, and streams to a stand-in server that has just stopped. The RPC
// wrappers are exercised against a real normd by normctl_test.py (normctl is built on this
// library).
#include "client/normd_client.h"

#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <memory>
#include <thread>

namespace normd::client {
namespace {

TEST(TensorEncodingTest, MatrixGoesOutAsRawLittleEndianFloat32) {
  Matrix m(2, 3);
  m << 1, 2, 3, 4, 5, -6.5f;
  v1::Tensor wire;
  wire.add_values(9);  // stale content is cleared
  EncodeTensor(m, &wire);
  ASSERT_EQ(wire.shape_size(), 2);
  EXPECT_EQ(wire.shape(0), 2);
  EXPECT_EQ(wire.shape(1), 3);
  EXPECT_EQ(wire.values_size(), 0);
  ASSERT_EQ(wire.raw().size(), 6 * sizeof(float));
  float last;
  std::memcpy(&last, wire.raw().data() + 5 * sizeof(float), sizeof(float));
  EXPECT_EQ(last, -6.5f);

  const Tensor back = DecodeTensor(wire);
  EXPECT_EQ(back.shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(back.matrix(), m);
}

TEST(TensorEncodingTest, ViewKeepsAnNdShape) {
  std::vector<float> data(2 * 1 * 4 * 4);
  for (size_t i = 0; i < data.size(); ++i) data[i] = static_cast<float>(i);
  v1::Tensor wire;
  EncodeTensor(TensorView(data.data(), {2, 1, 4, 4}), &wire);
  const Tensor back = DecodeTensor(wire);
  EXPECT_EQ(back.shape, (std::vector<int64_t>{2, 1, 4, 4}));
  EXPECT_EQ(back.values, data);
  EXPECT_EQ(back.rows(), 2);
  EXPECT_EQ(back.cols(), 16);
}

TEST(TensorEncodingTest, DecodesTheValuesEncodingAndScalars) {
  v1::Tensor wire;
  wire.add_shape(2);
  wire.add_shape(2);
  for (float v : {1.f, 2.f, 3.f, 4.f}) wire.add_values(v);
  EXPECT_EQ(DecodeTensor(wire).values, (std::vector<float>{1, 2, 3, 4}));

  v1::Tensor scalar;  // 0-d, like num_batches_tracked
  scalar.add_values(7);
  const Tensor s = DecodeTensor(scalar);
  EXPECT_TRUE(s.shape.empty());
  EXPECT_EQ(s.values, std::vector<float>{7});
}

TEST(TensorEncodingTest, MismatchedPayloadIsAnError) {
  v1::Tensor wire;
  wire.add_shape(3);
  wire.set_raw(std::string(8, '\0'));
  try {
    DecodeTensor(wire);
    FAIL() << "expected an Error";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), grpc::StatusCode::INTERNAL);
  }
  wire.clear_raw();
  wire.add_values(1);
  EXPECT_THROW(DecodeTensor(wire), Error);
}

TEST(ErrorTest, CarriesCodeMessageAndMethod) {
  const Error e(grpc::StatusCode::NOT_FOUND, "model 'x' not found", "GetModel");
  EXPECT_EQ(e.code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(e.message(), "model 'x' not found");
  EXPECT_EQ(e.method(), "GetModel");
  EXPECT_STREQ(e.what(), "GetModel: NOT_FOUND: model 'x' not found");
  EXPECT_STREQ(StatusCodeName(grpc::StatusCode::RESOURCE_EXHAUSTED), "RESOURCE_EXHAUSTED");
}

TEST(ClientTest, UnreadableTlsFileIsAnError) {
  ClientOptions options;
  options.use_tls = true;
  options.tls_ca_file = "/nonexistent/ca.pem";
  try {
    Client client(options);
    FAIL() << "expected an Error";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_NE(std::string(e.what()).find("/nonexistent/ca.pem"), std::string::npos);
  }
  options.tls_ca_file.clear();
  options.tls_cert_file = "/nonexistent/cert.pem";  // a certificate without its key
  EXPECT_THROW(Client{options}, Error);
}

// A loopback port nobody listens on: bound, read, released.
int ClosedPort() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr);
  socklen_t len = sizeof addr;
  getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  close(fd);
  return ntohs(addr.sin_port);
}

// A call to a server that cannot answer ends with an Error naming the method, no later than the
// client's timeout allows (plus a generous allowance for a loaded machine, far below gRPC's own
// 20 s connect timeout): at once on a closed port (UNAVAILABLE), and at the deadline on a port
// that accepts connections but never speaks HTTP/2 (DEADLINE_EXCEEDED, not before the timeout).
TEST(ClientTest, UnreachableServerFailsWithinTheDeadline) {
  using Clock = std::chrono::steady_clock;
  constexpr auto kTimeout = std::chrono::seconds(1);
  constexpr auto kAllowance = std::chrono::seconds(10);
  auto call = [&](int port, grpc::StatusCode* code, Clock::duration* elapsed) {
    ClientOptions options;
    options.server = "127.0.0.1:" + std::to_string(port);
    options.timeout = kTimeout;
    Client client(options);
    const Clock::time_point start = Clock::now();
    try {
      client.ListModels();
      FAIL() << "expected an Error";
    } catch (const Error& e) {
      *elapsed = Clock::now() - start;
      *code = e.code();
      EXPECT_EQ(e.method(), "ListModels");
    }
  };
  auto ms = [](Clock::duration d) {
    return std::chrono::duration_cast<std::chrono::milliseconds>(d).count();
  };

  grpc::StatusCode code = grpc::StatusCode::OK;
  Clock::duration elapsed{};
  ASSERT_NO_FATAL_FAILURE(call(ClosedPort(), &code, &elapsed));
  EXPECT_TRUE(code == grpc::StatusCode::UNAVAILABLE ||
              code == grpc::StatusCode::DEADLINE_EXCEEDED)
      << code;
  EXPECT_LT(ms(elapsed), ms(kTimeout + kAllowance)) << "ms";
  const Clock::duration closed_elapsed = elapsed;

  // Listening, never accepting: the kernel completes the TCP handshake, nothing more comes.
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  ASSERT_GE(fd, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof addr;
  ASSERT_EQ(bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
  ASSERT_EQ(listen(fd, 16), 0);
  ASSERT_EQ(getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len), 0);
  call(ntohs(addr.sin_port), &code, &elapsed);
  close(fd);
  EXPECT_EQ(code, grpc::StatusCode::DEADLINE_EXCEEDED);
  // gRPC fires a deadline at or after it; a millisecond of rounding is allowed for.
  EXPECT_GE(ms(elapsed), ms(kTimeout) - 1) << "ms";
  EXPECT_LT(ms(elapsed), ms(kTimeout + kAllowance)) << "ms";
  std::printf("[ deadline ] closed port failed after %lld ms, silent port after %lld ms "
              "(timeout %lld ms)\n",
              static_cast<long long>(ms(closed_elapsed)), static_cast<long long>(ms(elapsed)),
              static_cast<long long>(std::chrono::milliseconds(kTimeout).count()));
}

// Answers every TrainStream batch with a step number; no model behind it.
class EchoTrainer final : public v1::Trainer::Service {
  grpc::Status TrainStream(
      grpc::ServerContext*,
      grpc::ServerReaderWriter<v1::TrainStepResponse, v1::TrainStepRequest>* stream) override {
    v1::TrainStepRequest request;
    v1::TrainStepResponse response;
    while (stream->Read(&request)) {
      response.set_step(response.step() + 1);
      stream->Write(response);
    }
    return grpc::Status::OK;
  }
};

// A stand-in server on a free loopback port, running `service`; *port is set (0 on failure).
std::unique_ptr<grpc::Server> StartStandIn(grpc::Service* service, int* port) {
  grpc::ServerBuilder builder;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), port);
  builder.RegisterService(service);
  return builder.BuildAndStart();
}

// Answers ApplyGradients and TrainStep with fixed figures, to see them come through the client.
class FixedStepTrainer final : public v1::Trainer::Service {
  grpc::Status ApplyGradients(grpc::ServerContext*, const v1::ApplyGradientsRequest*,
                              v1::ApplyGradientsResponse* response) override {
    response->set_step(7);
    response->set_grad_norm(3.5);
    response->set_learning_rate(0.0125);
    return grpc::Status::OK;
  }
  grpc::Status TrainStep(grpc::ServerContext*, const v1::TrainStepRequest*,
                         v1::TrainStepResponse* response) override {
    response->set_step(8);
    response->set_grad_norm(0.75);
    response->set_learning_rate(0.5);
    return grpc::Status::OK;
  }
};

TEST(ClientTest, StepsReportGradNormAndLearningRate) {
  FixedStepTrainer service;
  int port = 0;
  std::unique_ptr<grpc::Server> server = StartStandIn(&service, &port);
  ASSERT_NE(port, 0);
  ClientOptions options;
  options.server = "127.0.0.1:" + std::to_string(port);
  Client client(options);
  const v1::ApplyGradientsResponse a = client.ApplyGradients("m");
  EXPECT_EQ(a.step(), 7u);
  EXPECT_EQ(a.grad_norm(), 3.5);
  EXPECT_EQ(a.learning_rate(), 0.0125);
  const std::vector<float> input(4, 0.5f);
  const v1::TrainStepResponse t = client.TrainStep("m", TensorView(input.data(), {1, 4}), {0});
  EXPECT_EQ(t.grad_norm(), 0.75);
  EXPECT_EQ(t.learning_rate(), 0.5);
  server->Shutdown();
}

// A channel that was connected to a server which has just stopped: streams opened now must fail
// promptly with UNAVAILABLE (or CANCELLED). In this situation gRPC Python 1.51 with retries on
// left some streams waiting forever (python_client_test.py, ServerGoneTest); the C++ sync API
// starts its operations in another order and did not (0 of 1,800 streams), which this keeps so.
TEST(ClientTest, StreamsOpenedRightAfterTheServerStoppedFailPromptly) {
  constexpr int kCycles = 30;
  constexpr int kStreamsPerCycle = 6;
  const std::vector<float> input(4, 0.5f);
  int failed = 0;
  int hung = 0;
  for (int cycle = 0; cycle < kCycles; ++cycle) {
    EchoTrainer service;
    int port = 0;
    std::unique_ptr<grpc::Server> server = StartStandIn(&service, &port);
    ASSERT_NE(port, 0);
    ClientOptions options;
    options.server = "127.0.0.1:" + std::to_string(port);
    options.stream_timeout = std::chrono::seconds(20);
    auto client = std::make_shared<Client>(options);
    {
      auto stream = client->OpenTrainStream("m");
      stream->Write(TensorView(input.data(), {1, 4}), {0});
      ASSERT_EQ(stream->Read().step(), 1);
      stream->Finish();
    }
    server->Shutdown(std::chrono::system_clock::now());
    server.reset();
    for (int i = 0; i < kStreamsPerCycle; ++i) {
      // Each stream runs on its own thread, so a hung one is seen as hung rather than hanging
      // the test; a hung thread is left behind (it holds its own references).
      auto done = std::make_shared<std::atomic<int>>(0);  // 0 running, 1 failed, 2 succeeded
      std::thread worker([client, done, input] {
        try {
          auto stream = client->OpenTrainStream("m");
          for (int k = 0; k < 4; ++k) stream->Write(TensorView(input.data(), {1, 4}), {0});
          stream->Read();
          done->store(2);
        } catch (const Error& e) {
          done->store(e.code() == grpc::StatusCode::UNAVAILABLE ||
                              e.code() == grpc::StatusCode::CANCELLED
                          ? 1
                          : 3);
        }
      });
      const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
      while (done->load() == 0 && std::chrono::steady_clock::now() < deadline) {
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
      }
      const int outcome = done->load();
      EXPECT_NE(outcome, 2) << "a stream succeeded with no server";
      EXPECT_NE(outcome, 3) << "a stream failed with a code other than UNAVAILABLE/CANCELLED";
      if (outcome == 0) {
        ++hung;
        worker.detach();
      } else {
        worker.join();
        if (outcome == 1) ++failed;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(i));
    }
  }
  EXPECT_EQ(hung, 0) << "streams still waiting 5 s after the server stopped";
  EXPECT_EQ(failed, kCycles * kStreamsPerCycle);
}

}  // namespace
}  // namespace normd::client
