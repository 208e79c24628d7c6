// normd_server_latency: starts a fresh normd on loopback and measures the round trip of the
// reference requests from a gRPC client in this process:
//   - eval-mode Forward, batch 1, of 32 -> 64 -> BatchNorm1d -> ReLU -> 10 (1 client and 8);
//   - TrainStep, batch 256, of 784-512-BatchNorm1d-ReLU-512-BatchNorm1d-ReLU-10, cross-entropy,
//     SGD momentum 0.9 (unary and over TrainStream).
// Usage: normd_server_latency [--compute-threads N] [extra normd flags...]
// Prints a table; asserts nothing (timings belong in reports, not in tests).
#include <signal.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <numeric>
#include <thread>

#include "tests/server/normd_process.h"

namespace normd::testing {
namespace {

using Clock = std::chrono::steady_clock;

struct Summary {
  double p50_us, p90_us, p99_us, mean_us;
};

Summary Summarize(std::vector<double> us) {
  std::sort(us.begin(), us.end());
  auto at = [&](double q) { return us[static_cast<size_t>(q * (us.size() - 1))]; };
  return {at(0.5), at(0.9), at(0.99), std::accumulate(us.begin(), us.end(), 0.0) / us.size()};
}

v1::ModelSpec ReferenceMlp() {
  v1::ModelSpec spec;
  spec.add_input_shape(784);
  auto linear = [&](int in, int out) {
    auto* l = spec.add_layers()->mutable_linear();
    l->set_in_features(in);
    l->set_out_features(out);
  };
  linear(784, 512);
  spec.add_layers()->mutable_batch_norm1d()->set_num_features(512);
  spec.add_layers()->mutable_relu();
  linear(512, 512);
  spec.add_layers()->mutable_batch_norm1d()->set_num_features(512);
  spec.add_layers()->mutable_relu();
  linear(512, 10);
  spec.set_loss(v1::LOSS_CROSS_ENTROPY);
  spec.mutable_optimizer()->mutable_sgd()->set_lr(0.01f);
  spec.mutable_optimizer()->mutable_sgd()->set_momentum(0.9f);
  return spec;
}

int Main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  std::string error;
  auto server = NormdProcess::Start(args, &error);
  if (server == nullptr) {
    std::fprintf(stderr, "%s\n", error.c_str());
    return 1;
  }
  auto stub = server->NewStub();

  // --- Small model, eval Forward, batch 1 ---
  v1::CreateModelRequest create;
  create.set_id("small");
  *create.mutable_spec() = MlpSpec(32, 64, 10);
  v1::Model model;
  if (!stub->CreateModel(Ctx().get(), create, &model).ok()) return 1;
  v1::SetModeRequest mode;
  mode.set_model("small");
  mode.set_mode(v1::MODE_EVAL);
  if (!stub->SetMode(Ctx().get(), mode, &model).ok()) return 1;
  v1::ForwardRequest fwd;
  fwd.set_model("small");
  *fwd.mutable_input() = MakeTensor({1, 32}, RandomValues(32, 1), true);
  std::vector<double> us;
  for (int i = 0; i < 5500; ++i) {
    v1::ForwardResponse resp;
    grpc::ClientContext ctx;
    const auto t0 = Clock::now();
    if (!stub->Forward(&ctx, fwd, &resp).ok()) return 1;
    if (i >= 500) us.push_back(std::chrono::duration<double, std::micro>(Clock::now() - t0).count());
  }
  const Summary small = Summarize(us);

  // 8 concurrent clients, 2 s.
  std::atomic<int64_t> done{0};
  std::atomic<bool> stop{false};
  std::vector<std::thread> clients;
  for (int c = 0; c < 8; ++c) {
    clients.emplace_back([&] {
      auto s = server->NewStub();
      while (!stop.load()) {
        v1::ForwardResponse resp;
        grpc::ClientContext ctx;
        if (s->Forward(&ctx, fwd, &resp).ok()) ++done;
      }
    });
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  const int64_t start_count = done.load();
  const auto t_start = Clock::now();
  std::this_thread::sleep_for(std::chrono::seconds(2));
  const double qps = (done.load() - start_count) /
                     std::chrono::duration<double>(Clock::now() - t_start).count();
  stop = true;
  for (std::thread& t : clients) t.join();

  // --- Reference MLP, TrainStep batch 256 ---
  create.set_id("mlp");
  *create.mutable_spec() = ReferenceMlp();
  if (!stub->CreateModel(Ctx().get(), create, &model).ok()) return 1;
  const int n = 256;
  std::vector<v1::TrainStepRequest> batches(4);
  for (int b = 0; b < 4; ++b) {
    batches[b].set_model("mlp");
    *batches[b].mutable_input() = MakeTensor({n, 784}, RandomValues(n * 784, 10 + b), true);
    const std::vector<int64_t> labels = RandomLabels(n, 10, b);
    *batches[b].mutable_labels() = {labels.begin(), labels.end()};
  }
  us.clear();
  for (int i = 0; i < 220; ++i) {
    v1::TrainStepResponse resp;
    grpc::ClientContext ctx;
    const auto t0 = Clock::now();
    if (!stub->TrainStep(&ctx, batches[i % 4], &resp).ok()) return 1;
    if (i >= 20) us.push_back(std::chrono::duration<double, std::micro>(Clock::now() - t0).count());
  }
  const Summary train = Summarize(us);

  // TrainStream: the client keeps a window of requests in flight.
  const int steps = 200;
  grpc::ClientContext sctx;
  auto stream = stub->TrainStream(&sctx);
  const auto s0 = Clock::now();
  std::thread writer([&] {
    for (int i = 0; i < steps; ++i) stream->Write(batches[i % 4]);
    stream->WritesDone();
  });
  v1::TrainStepResponse sresp;
  int answered = 0;
  while (stream->Read(&sresp)) ++answered;
  writer.join();
  const double stream_s = std::chrono::duration<double>(Clock::now() - s0).count();
  if (!stream->Finish().ok() || answered != steps) return 1;

  std::printf("normd round trips on loopback (%u hardware threads; server flags:",
              std::thread::hardware_concurrency());
  for (const std::string& a : args) std::printf(" %s", a.c_str());
  std::printf(")\n");
  std::printf("%-46s %9s %9s %9s %9s\n", "request", "p50 us", "p90 us", "p99 us", "mean us");
  std::printf("%-46s %9.1f %9.1f %9.1f %9.1f\n", "eval Forward, batch 1, 32-64-BN-ReLU-10",
              small.p50_us, small.p90_us, small.p99_us, small.mean_us);
  std::printf("%-46s %9.0f %9.0f %9.0f %9.0f\n", "TrainStep, batch 256, 784-512-512-10 (BN)",
              train.p50_us, train.p90_us, train.p99_us, train.mean_us);
  std::printf("eval Forward batch 1 with 8 concurrent clients: %.0f QPS\n", qps);
  std::printf("TrainStep batch 256 unary: %.0f samples/s (from the mean)\n",
              n / (train.mean_us * 1e-6));
  std::printf("TrainStream batch 256: %.0f samples/s (%d steps in %.2f s)\n",
              steps * n / stream_s, steps, stream_s);
  // The server's own view (handler start to status, so queueing and compute, no transport).
  const std::string metrics = HttpGet(server->metrics_port(), "/metrics");
  for (const char* method : {"Forward", "TrainStep"}) {
    const std::vector<std::string> labels = {std::string("method=\"") + method + "\"",
                                             "code=\"OK\""};
    const double sum = MetricValue(metrics, "normd_rpc_duration_seconds_sum", labels);
    const double count = MetricValue(metrics, "normd_rpc_duration_seconds_count", labels);
    std::printf("server-side mean %s time (all calls above): %.1f us\n", method,
                1e6 * sum / count);
  }
  server->Stop(SIGTERM, std::chrono::seconds(20));
  return 0;
}

}  // namespace
}  // namespace normd::testing

int main(int argc, char** argv) { return normd::testing::Main(argc, argv); }
