// Operational tests of the normd binary: health (Check, Watch, NOT_SERVING on shutdown),
// server reflection, the /metrics endpoint (promtool-clean, every contract series present and
// moving), limits, graceful shutdown, and --check-config.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <atomic>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <set>
#include <thread>

#include "grpc/health/v1/health.grpc.pb.h"
#include "grpc/reflection/v1alpha/reflection.grpc.pb.h"
#include "tests/server/normd_process.h"

namespace normd::testing {
namespace {

using grpc::StatusCode;
using grpc::health::v1::Health;
using grpc::health::v1::HealthCheckRequest;
using grpc::health::v1::HealthCheckResponse;

std::unique_ptr<NormdProcess> StartOrDie(const std::vector<std::string>& args = {}) {
  std::string error;
  std::unique_ptr<NormdProcess> p = NormdProcess::Start(args, &error);
  EXPECT_NE(p, nullptr) << error;
  return p;
}

grpc::Status CreateModel(v1::Trainer::Stub* stub, const std::string& id,
                         const v1::ModelSpec& spec = MlpSpec()) {
  v1::CreateModelRequest req;
  req.set_id(id);
  *req.mutable_spec() = spec;
  v1::Model m;
  return stub->CreateModel(Ctx().get(), req, &m);
}

grpc::Status TrainStep(v1::Trainer::Stub* stub, const std::string& id, int n, uint64_t seed,
                       float shift = 0.0f) {
  v1::TrainStepRequest req;
  req.set_model(id);
  *req.mutable_input() = MakeTensor({n, 32}, RandomValues(n * 32, seed, 1.0f, shift), true);
  const std::vector<int64_t> labels = RandomLabels(n, 10, seed);
  *req.mutable_labels() = {labels.begin(), labels.end()};
  v1::TrainStepResponse resp;
  return stub->TrainStep(Ctx().get(), req, &resp);
}

grpc::Status Forward(v1::Trainer::Stub* stub, const std::string& id, int n, uint64_t seed,
                     float shift = 0.0f) {
  v1::ForwardRequest req;
  req.set_model(id);
  *req.mutable_input() = MakeTensor({n, 32}, RandomValues(n * 32, seed, 1.0f, shift), true);
  v1::ForwardResponse resp;
  return stub->Forward(Ctx().get(), req, &resp);
}

grpc::Status SetMode(v1::Trainer::Stub* stub, const std::string& id, v1::Mode mode) {
  v1::SetModeRequest req;
  req.set_model(id);
  req.set_mode(mode);
  v1::Model m;
  return stub->SetMode(Ctx().get(), req, &m);
}

// Runs a command, returning its exit status and (merged) output.
int RunCommand(const std::string& command, std::string* output) {
  FILE* p = popen((command + " 2>&1").c_str(), "r");
  if (p == nullptr) return -1;
  char buf[4096];
  output->clear();
  for (size_t n; (n = fread(buf, 1, sizeof(buf), p)) > 0;) output->append(buf, n);
  const int status = pclose(p);
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

// --- Health and reflection ---------------------------------------------------------------------

TEST(HealthTest, CheckWatchAndNotServingOnShutdown) {
  auto server = StartOrDie();
  ASSERT_NE(server, nullptr);
  auto health = Health::NewStub(server->NewChannel());
  for (const char* service : {"", "normd.v1.Trainer"}) {
    HealthCheckRequest req;
    req.set_service(service);
    HealthCheckResponse resp;
    ASSERT_TRUE(health->Check(Ctx().get(), req, &resp).ok()) << service;
    EXPECT_EQ(resp.status(), HealthCheckResponse::SERVING) << service;
  }
  HealthCheckRequest unknown;
  unknown.set_service("no.such.Service");
  HealthCheckResponse resp;
  EXPECT_EQ(health->Check(Ctx().get(), unknown, &resp).error_code(), StatusCode::NOT_FOUND);

  // Watch: SERVING now, NOT_SERVING once SIGTERM arrives, and the process exits 0.
  grpc::ClientContext watch_ctx;
  watch_ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  HealthCheckRequest req;
  req.set_service("normd.v1.Trainer");
  auto reader = health->Watch(&watch_ctx, req);
  ASSERT_TRUE(reader->Read(&resp));
  EXPECT_EQ(resp.status(), HealthCheckResponse::SERVING);

  std::atomic<int> exit_code{-2};
  std::thread stopper([&] { exit_code = server->Stop(SIGTERM, std::chrono::seconds(20)); });
  std::vector<HealthCheckResponse::ServingStatus> seen;
  while (reader->Read(&resp)) seen.push_back(resp.status());
  reader->Finish();
  stopper.join();
  ASSERT_FALSE(seen.empty());
  EXPECT_EQ(seen.back(), HealthCheckResponse::NOT_SERVING);
  EXPECT_EQ(exit_code.load(), 0);
  const std::string log = server->Log();
  EXPECT_NE(log.find("event=shutdown signal=SIGTERM"), std::string::npos) << log;
  EXPECT_NE(log.find("event=stopped"), std::string::npos) << log;
}

TEST(ReflectionTest, ListsServicesAndServesTheContract) {
  auto server = StartOrDie();
  ASSERT_NE(server, nullptr);
  auto stub = grpc::reflection::v1alpha::ServerReflection::NewStub(server->NewChannel());
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  auto stream = stub->ServerReflectionInfo(&ctx);

  grpc::reflection::v1alpha::ServerReflectionRequest req;
  req.set_list_services("");
  ASSERT_TRUE(stream->Write(req));
  grpc::reflection::v1alpha::ServerReflectionResponse resp;
  ASSERT_TRUE(stream->Read(&resp));
  std::set<std::string> services;
  for (const auto& s : resp.list_services_response().service()) services.insert(s.name());
  EXPECT_TRUE(services.count("normd.v1.Trainer")) << resp.ShortDebugString();
  EXPECT_TRUE(services.count("grpc.health.v1.Health")) << resp.ShortDebugString();
  EXPECT_TRUE(services.count("grpc.reflection.v1alpha.ServerReflection"));

  // What grpcurl does next: fetch the file describing the service.
  req.set_file_containing_symbol("normd.v1.Trainer");
  ASSERT_TRUE(stream->Write(req));
  ASSERT_TRUE(stream->Read(&resp));
  ASSERT_TRUE(resp.has_file_descriptor_response()) << resp.ShortDebugString();
  ASSERT_GE(resp.file_descriptor_response().file_descriptor_proto_size(), 1);
  const std::string& file = resp.file_descriptor_response().file_descriptor_proto(0);
  EXPECT_NE(file.find("normd/v1/normd.proto"), std::string::npos);
  EXPECT_NE(file.find("TrainStream"), std::string::npos);
  stream->WritesDone();
  EXPECT_TRUE(stream->Finish().ok());
}

// --- Metrics -----------------------------------------------------------------------------------

TEST(MetricsTest, PromtoolCleanSeriesPresentAndMoving) {
  auto server = StartOrDie();
  ASSERT_NE(server, nullptr);
  auto stub = server->NewStub();
  ASSERT_TRUE(CreateModel(stub.get(), "met-a").ok());
  ASSERT_TRUE(CreateModel(stub.get(), "met-b").ok());

  // Train met-a on the reference distribution, then serve it in eval mode.
  for (int i = 0; i < 30; ++i) ASSERT_TRUE(TrainStep(stub.get(), "met-a", 32, i).ok());
  ASSERT_TRUE(SetMode(stub.get(), "met-a", v1::MODE_EVAL).ok());
  v1::ForwardResponse ignored;
  EXPECT_EQ(Forward(stub.get(), "met-a", 0, 1).error_code(), StatusCode::INVALID_ARGUMENT);
  for (int i = 0; i < 10; ++i) ASSERT_TRUE(Forward(stub.get(), "met-a", 16, 100 + i).ok());

  std::string text = HttpGet(server->metrics_port(), "/metrics");
  ASSERT_FALSE(text.empty());
  // promtool reads the exposition on stdin and prints nothing when it is clean.
  const std::string path = server->dir() + "/metrics.txt";
  std::ofstream(path) << text;
  std::string out;
  const int rc = RunCommand(std::string(PROMTOOL) + " check metrics < " + path, &out);
  EXPECT_EQ(rc, 0) << out;
  EXPECT_EQ(out, "") << out;

  for (const char* name :
       {"normd_rpc_duration_seconds_bucket", "normd_rpcs_total", "normd_samples_total",
        "normd_train_steps_total", "normd_train_loss", "normd_models", "normd_bn_mean_shift_sum",
        "normd_bn_var_log_ratio_count", "normd_bn_running_mean_update_norm",
        "normd_bn_running_var_update_norm", "normd_bn_batches_tracked", "normd_build_info",
        "normd_nonfinite_steps_total", "normd_grad_norm", "normd_learning_rate",
        "process_resident_memory_bytes",
        "process_cpu_seconds_total", "process_start_time_seconds"}) {
    EXPECT_FALSE(std::isnan(MetricValue(text, name))) << name << " missing";
  }
  EXPECT_EQ(MetricValue(text, "normd_models"), 2.0);
  EXPECT_EQ(MetricValue(text, "normd_train_steps_total", {"model=\"met-a\""}), 30.0);
  EXPECT_EQ(MetricValue(text, "normd_samples_total", {"model=\"met-a\"", "op=\"train\""}),
            30.0 * 32);
  EXPECT_EQ(MetricValue(text, "normd_samples_total", {"model=\"met-a\"", "op=\"forward\""}),
            160.0);
  EXPECT_EQ(MetricValue(text, "normd_rpcs_total", {"method=\"TrainStep\"", "code=\"OK\""}), 30.0);
  EXPECT_EQ(MetricValue(text, "normd_rpcs_total",
                        {"method=\"Forward\"", "code=\"INVALID_ARGUMENT\""}),
            1.0);
  EXPECT_EQ(MetricValue(text, "normd_bn_batches_tracked", {"model=\"met-a\"", "layer=\"bn1\""}),
            30.0);
  EXPECT_GT(MetricValue(text, "normd_bn_running_mean_update_norm", {"model=\"met-a\""}), 0.0);
  EXPECT_GT(MetricValue(text, "normd_train_loss", {"model=\"met-a\""}), 0.0);
  EXPECT_GT(MetricValue(text, "normd_grad_norm", {"model=\"met-a\""}), 0.0);
  EXPECT_GT(MetricValue(text, "normd_learning_rate", {"model=\"met-a\""}), 0.0);
  EXPECT_EQ(MetricValue(text, "normd_build_info", {"version=\""}), 1.0);
  EXPECT_GT(MetricValue(text, "process_resident_memory_bytes"), 1e6);
  EXPECT_GT(MetricValue(text, "process_start_time_seconds"), 1.6e9);
  EXPECT_EQ(MetricValue(text, "normd_bn_mean_shift_count",
                        {"model=\"met-a\"", "layer=\"bn1\"", "mode=\"train\""}),
            30.0);

  // Eval-mode drift: in-distribution traffic, then shifted inputs; the mean of the per-batch
  // mean shift over each window rises.
  auto eval_window = [&](const std::string& before, const std::string& after) {
    const std::vector<std::string> l = {"model=\"met-a\"", "layer=\"bn1\"", "mode=\"eval\""};
    const double sum = MetricValue(after, "normd_bn_mean_shift_sum", l) -
                       MetricValue(before, "normd_bn_mean_shift_sum", l);
    const double count = MetricValue(after, "normd_bn_mean_shift_count", l) -
                         MetricValue(before, "normd_bn_mean_shift_count", l);
    EXPECT_EQ(count, 10.0);
    return sum / count;
  };
  const std::string t0 = text;
  for (int i = 0; i < 10; ++i) ASSERT_TRUE(Forward(stub.get(), "met-a", 16, 200 + i).ok());
  const std::string t1 = HttpGet(server->metrics_port(), "/metrics");
  for (int i = 0; i < 10; ++i) ASSERT_TRUE(Forward(stub.get(), "met-a", 16, 300 + i, 2.0f).ok());
  const std::string t2 = HttpGet(server->metrics_port(), "/metrics");
  const double in_distribution = eval_window(t0, t1);
  const double shifted = eval_window(t1, t2);
  EXPECT_GT(shifted, 2.0 * in_distribution) << in_distribution << " vs " << shifted;
  // Eval traffic leaves the running statistics (and their counters) alone.
  EXPECT_EQ(MetricValue(t2, "normd_bn_batches_tracked", {"model=\"met-a\""}), 30.0);

  // A deleted model's series disappear.
  v1::DeleteModelRequest del;
  del.set_model("met-a");
  v1::DeleteModelResponse del_resp;
  ASSERT_TRUE(stub->DeleteModel(Ctx().get(), del, &del_resp).ok());
  const std::string t3 = HttpGet(server->metrics_port(), "/metrics");
  EXPECT_EQ(t3.find("model=\"met-a\""), std::string::npos);
  EXPECT_NE(t3.find("model=\"met-b\""), std::string::npos);
  EXPECT_EQ(MetricValue(t3, "normd_models"), 1.0);
}

// --- Limits --------------------------------------------------------------------------------------

TEST(LimitsTest, ModelsMessageSizeAndQueue) {
  auto server = StartOrDie({"--max-models=2", "--max-message-bytes=65536",
                            "--max-queued-per-model=1", "--compute-threads=1"});
  ASSERT_NE(server, nullptr);
  auto stub = server->NewStub();
  ASSERT_TRUE(CreateModel(stub.get(), "lim-1").ok());
  ASSERT_TRUE(CreateModel(stub.get(), "lim-2").ok());
  const grpc::Status third = CreateModel(stub.get(), "lim-3");
  EXPECT_EQ(third.error_code(), StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_NE(third.error_message().find("--max-models"), std::string::npos);

  // 100 000 floats do not fit in 64 KiB.
  v1::ForwardRequest big;
  big.set_model("lim-1");
  *big.mutable_input() = MakeTensor({3125, 32}, std::vector<float>(100000, 0.5f), true);
  v1::ForwardResponse resp;
  EXPECT_EQ(stub->Forward(Ctx().get(), big, &resp).error_code(), StatusCode::RESOURCE_EXHAUSTED);

  // With one request allowed per model, a burst of concurrent steps sees refusals, quickly;
  // every step acknowledged is counted, no other error occurs. The clients are connected
  // before a round and start together, so a fast machine's short steps still overlap.
  constexpr int kClients = 8;
  std::vector<std::unique_ptr<v1::Trainer::Stub>> stubs;
  for (int c = 0; c < kClients; ++c) {
    std::shared_ptr<grpc::Channel> channel = server->NewChannel();
    ASSERT_TRUE(channel->WaitForConnected(std::chrono::system_clock::now() +
                                          std::chrono::seconds(10)));
    stubs.push_back(v1::Trainer::NewStub(channel));
  }
  std::atomic<int> ok{0}, refused{0}, other{0};
  int rounds = 0;
  for (; rounds < 200 && refused.load() == 0; ++rounds) {
    std::atomic<int> ready{0};
    std::vector<std::thread> threads;
    for (int c = 0; c < kClients; ++c) {
      threads.emplace_back([&, c] {
        ++ready;
        while (ready.load() < kClients) std::this_thread::yield();
        const grpc::Status st = TrainStep(stubs[c].get(), "lim-1", 256, 10 * rounds + c);
        if (st.ok()) {
          ++ok;
        } else if (st.error_code() == StatusCode::RESOURCE_EXHAUSTED) {
          ++refused;
        } else {
          ++other;
        }
      });
    }
    for (std::thread& t : threads) t.join();
  }
  EXPECT_GT(refused.load(), 0);
  EXPECT_EQ(other.load(), 0);
  std::printf("[ queue ] %d rounds of %d clients: %d steps, %d refused\n", rounds, kClients,
              ok.load(), refused.load());
  v1::GetModelRequest get;
  get.set_model("lim-1");
  v1::Model m;
  ASSERT_TRUE(stub->GetModel(Ctx().get(), get, &m).ok());
  EXPECT_EQ(m.step(), static_cast<uint64_t>(ok.load()));
}

// --- Shutdown ------------------------------------------------------------------------------------

TEST(ShutdownTest, DrainsInFlightWorkAndRefusesNewCalls) {
  auto server = StartOrDie({"--drain-timeout=10"});
  ASSERT_NE(server, nullptr);
  auto stub = server->NewStub();
  ASSERT_TRUE(CreateModel(stub.get(), "drain-1").ok());

  // A client streaming steps until the server, told to stop, ends the stream: the stream is in
  // flight at SIGTERM, so the server must wait for it (the stop line says drained=all, not
  // deadline) and end it itself once the step it holds is answered (UNAVAILABLE "shutting
  // down"), not have it cut (CANCELLED, or UNAVAILABLE from the transport). The process exits 0.
  std::atomic<int> answered{0};
  std::atomic<bool> streaming{false};
  grpc::Status stream_status;
  std::thread client([&] {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    auto stream = stub->TrainStream(&ctx);
    v1::TrainStepResponse resp;
    for (int i = 0;; ++i) {
      v1::TrainStepRequest req;
      req.set_model("drain-1");
      *req.mutable_input() = MakeTensor({64, 32}, RandomValues(64 * 32, i), true);
      const std::vector<int64_t> labels = RandomLabels(64, 10, i);
      *req.mutable_labels() = {labels.begin(), labels.end()};
      if (!stream->Write(req) || !stream->Read(&resp)) break;
      ++answered;
      streaming = true;
    }
    stream->WritesDone();
    stream_status = stream->Finish();
  });
  while (!streaming.load()) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  const auto t0 = std::chrono::steady_clock::now();
  const int code = server->Stop(SIGTERM, std::chrono::seconds(20));
  const auto drain = std::chrono::steady_clock::now() - t0;
  client.join();
  EXPECT_EQ(code, 0) << server->Log();
  EXPECT_EQ(stream_status.error_code(), StatusCode::UNAVAILABLE)
      << stream_status.error_code() << ": " << stream_status.error_message();
  EXPECT_EQ(stream_status.error_message(), "the server is shutting down");
  EXPECT_GT(answered.load(), 0);
  const std::string stop_log = server->Log();
  EXPECT_NE(stop_log.find("event=stopped drained=all "), std::string::npos) << stop_log;
  std::printf("[ drain ] %d steps answered; stopped in %.0f ms\n", answered.load(),
              std::chrono::duration<double, std::milli>(drain).count());

  // The port is closed now: a new call fails UNAVAILABLE.
  v1::ListModelsResponse list;
  EXPECT_EQ(stub->ListModels(Ctx(std::chrono::seconds(2)).get(), v1::ListModelsRequest(), &list)
                .error_code(),
            StatusCode::UNAVAILABLE);
  const std::string log = server->Log();
  EXPECT_NE(log.find("event=model_created model=drain-1"), std::string::npos) << log;
}

// --- Persistence ---------------------------------------------------------------------------------

TEST(PersistenceTest, RestartRestoresEveryModelAndInMemoryHasNone) {
  std::string tmpl = (std::filesystem::temp_directory_path() / "normd-data-XXXXXX").string();
  ASSERT_NE(mkdtemp(tmpl.data()), nullptr);
  const std::string data = "--data-dir=" + tmpl;
  std::map<std::string, std::vector<float>> before;
  v1::Model model_before;
  {
    auto server = StartOrDie({data});
    ASSERT_NE(server, nullptr);
    auto stub = server->NewStub();
    ASSERT_TRUE(CreateModel(stub.get(), "keep-1").ok());
    for (int i = 0; i < 5; ++i) ASSERT_TRUE(TrainStep(stub.get(), "keep-1", 16, i).ok());
    ASSERT_TRUE(SetMode(stub.get(), "keep-1", v1::MODE_EVAL).ok());
    v1::GetStateRequest gs;
    gs.set_model("keep-1");
    gs.set_include_optimizer(true);
    v1::ModelState st;
    ASSERT_TRUE(stub->GetState(Ctx().get(), gs, &st).ok());
    before = StateMap(st);
    v1::GetModelRequest gm;
    gm.set_model("keep-1");
    ASSERT_TRUE(stub->GetModel(Ctx().get(), gm, &model_before).ok());
    EXPECT_EQ(server->Stop(SIGTERM, std::chrono::seconds(20)), 0);  // saves what changed
  }
  {
    auto server = StartOrDie({data});
    ASSERT_NE(server, nullptr);
    auto stub = server->NewStub();
    v1::GetModelRequest gm;
    gm.set_model("keep-1");
    v1::Model m;
    ASSERT_TRUE(stub->GetModel(Ctx().get(), gm, &m).ok());
    EXPECT_EQ(m.step(), 5u);
    EXPECT_EQ(m.mode(), v1::MODE_EVAL);
    EXPECT_EQ(m.spec().SerializeAsString(), model_before.spec().SerializeAsString());
    v1::GetStateRequest gs;
    gs.set_model("keep-1");
    gs.set_include_optimizer(true);
    v1::ModelState st;
    ASSERT_TRUE(stub->GetState(Ctx().get(), gs, &st).ok());
    const auto after = StateMap(st);
    ASSERT_EQ(after.size(), before.size());
    for (const auto& [name, v] : before) EXPECT_TRUE(BitEqual(v, after.at(name))) << name;
  }
  {
    auto server = StartOrDie({data, "--in-memory"});
    ASSERT_NE(server, nullptr);
    auto stub = server->NewStub();
    v1::ListModelsResponse list;
    ASSERT_TRUE(stub->ListModels(Ctx().get(), v1::ListModelsRequest(), &list).ok());
    EXPECT_EQ(list.models_size(), 0);
    ASSERT_TRUE(CreateModel(stub.get(), "mem-1").ok());
    v1::SaveModelRequest req;
    req.set_model("mem-1");
    v1::SaveModelResponse resp;
    const grpc::Status s = stub->SaveModel(Ctx().get(), req, &resp);
    EXPECT_EQ(s.error_code(), StatusCode::FAILED_PRECONDITION);
    EXPECT_NE(s.error_message().find("persistence not configured"), std::string::npos);
  }
  std::error_code ec;
  std::filesystem::remove_all(tmpl, ec);
}

// --- Configuration -------------------------------------------------------------------------------

TEST(ConfigTest, CheckConfigValidatesFlagsAndEnvironment) {
  const std::string bin = NORMD_BINARY;
  std::string out;
  EXPECT_EQ(RunCommand("NORMD_LISTEN=0.0.0.0:50051 NORMD_METRICS=0.0.0.0:9464 NORMD_DATA_DIR=/tmp "
                "NORMD_MAX_MODELS=8 NORMD_MAX_MESSAGE_BYTES=1048576 NORMD_COMPUTE_THREADS=2 "
                "NORMD_LOG_LEVEL=debug NORMD_MAX_BATCH_ELEMENTS=100000 NORMD_MAX_PARAMETERS=1000 "
                "NORMD_MAX_RETAINED_FORWARDS=2 NORMD_RETAINED_FORWARD_TIMEOUT=5 "
                "NORMD_DRAIN_TIMEOUT=3 " + bin + " --check-config",
                &out),
            0)
      << out;
  EXPECT_NE(out.find("listen=0.0.0.0:50051"), std::string::npos) << out;
  EXPECT_NE(out.find("max_models=8"), std::string::npos) << out;
  EXPECT_NE(out.find("log_level=debug"), std::string::npos) << out;
  // A NORMD_* variable that names no flag is reported (a typo must not pass silently).
  ASSERT_EQ(RunCommand("NORMD_MAX_MODLES=3 " + bin + " --check-config", &out), 0) << out;
  EXPECT_NE(out.find("note: NORMD_MAX_MODLES is not a normd setting"), std::string::npos) << out;
  // A flag wins over its environment variable.
  ASSERT_EQ(RunCommand("NORMD_MAX_MODELS=8 " + bin + " --check-config --max-models 3", &out), 0) << out;
  EXPECT_NE(out.find("max_models=3"), std::string::npos) << out;

  EXPECT_NE(RunCommand(bin + " --check-config --listen nohostport", &out), 0);
  EXPECT_NE(out.find("--listen"), std::string::npos) << out;
  EXPECT_NE(RunCommand(bin + " --check-config --metrics 127.0.0.1:99999", &out), 0);
  EXPECT_NE(RunCommand(bin + " --check-config --max-models 0", &out), 0);
  EXPECT_NE(RunCommand(bin + " --check-config --log-level chatty", &out), 0);
  EXPECT_NE(RunCommand(bin + " --check-config --no-such-flag", &out), 0);
  EXPECT_NE(RunCommand("NORMD_MAX_MODELS=many " + bin + " --check-config", &out), 0);
  EXPECT_NE(RunCommand(bin + " --check-config --data-dir /etc/hostname", &out), 0);
  EXPECT_NE(RunCommand(bin + " --check-config --job-stall-timeout -1", &out), 0);
  EXPECT_NE(out.find("--job-stall-timeout must be in [0, 86400]"), std::string::npos) << out;
  ASSERT_EQ(RunCommand("NORMD_JOB_STALL_TIMEOUT=0 " + bin + " --check-config", &out), 0) << out;
  EXPECT_NE(out.find("job_stall_timeout=off"), std::string::npos) << out;

  ASSERT_EQ(RunCommand(bin + " --help", &out), 0);
  for (const char* flag : {"--listen", "--metrics", "--data-dir", "--max-models",
                           "--max-message-bytes", "--max-batch-elements", "--max-parameters",
                           "--max-retained-forwards", "--retained-forward-timeout",
                           "--compute-threads", "--log-level", "--drain-timeout",
                           "--job-stall-timeout", "--check-config", "NORMD_LISTEN"}) {
    EXPECT_NE(out.find(flag), std::string::npos) << flag;
  }
}

TEST(ConfigTest, BusyPortFailsToStart) {
  auto first = StartOrDie();
  ASSERT_NE(first, nullptr);
  std::string error;
  auto second = NormdProcess::Start({"--listen=" + first->address()}, &error);
  EXPECT_EQ(second, nullptr);
  EXPECT_NE(error.find("event=start_failed"), std::string::npos) << error;
}

}  // namespace
}  // namespace normd::testing
