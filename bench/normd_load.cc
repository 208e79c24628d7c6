// normd_load: RPC throughput and latency against a running normd, through the C++ client
// library (client/normd_client.h). Loopback use; every scenario is bounded in time or steps.
//
// Scenarios (--scenario):
//   ping       health check; exit 0 when the server answers SERVING (scripts wait on it).
//   train      trains the reference MLP (bench/reference_models.h) from one client, over a
//              TrainStream (--rpc stream, up to --window batches in flight) or unary TrainStep
//              calls (--rpc unary); --warmup steps, then --repeats timed runs of --steps steps.
//              Prints {"samples_per_s": [...], "median": m, ...} like normd_core_trainer, with
//              the client's own CPU time per sample as client_cpu_samples_per_s. With --model ID
//              it trains that model, creating it if needed, and leaves it on the server (so
//              several runs can train one model: the memory check of compare_torch.py).
//              With --spec FILE (a ModelSpec in protobuf JSON, as normctl create takes) it
//              trains that model instead of the MLP, on --data/--labels (required then) of
//              the spec's input shape: the CNNs of cnn_bench.py.
//   delete     deletes --model ID.
//   forward    --clients threads, each with its own channel, send eval-mode Forward requests of
//              batch 1 to the small model (32-64-BatchNorm1d-ReLU-10) for --duration seconds.
//   trainload  --clients threads, each training its own reference MLP (one shared model with
//              --shared-model 1) with unary TrainStep of --batch samples for --duration seconds.
// forward and trainload print {"qps": q, "p50_us": .., "p90_us": .., "p99_us": .., ...}; a
// request that fails counts in "errors" (the first message goes to stderr).
//
// Data for train: --data X.f32 --labels Y.i64 as for normd_core_trainer, or generated.
// Models are created with ids "bench-<scenario>-<pid>-<n>" and deleted at the end.
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <fstream>
#include <iterator>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <google/protobuf/util/json_util.h>

#include "bench/reference_models.h"
#include "client/normd_client.h"
#include "core/rng.h"

namespace normd {
namespace bench {
namespace {

using Clock = std::chrono::steady_clock;
namespace v1 = ::normd::v1;

struct Options {
  std::string address = "127.0.0.1:50051";
  std::string scenario = "train";
  std::string rpc = "stream";
  int64_t batch = 256;
  int steps = 50;
  int warmup = 10;
  int repeats = 5;
  int window = 2;
  int clients = 1;
  bool shared_model = false;
  double duration = 5.0;
  std::string data, labels;
  std::string model;  // train: an existing or kept model instead of a fresh one
  std::string spec;   // train: a ModelSpec JSON file instead of the reference MLP
};

[[noreturn]] void Usage(const std::string& why) {
  std::fprintf(stderr,
               "normd_load: %s\nusage: normd_load --address HOST:PORT --scenario "
               "ping|train|forward|trainload [--rpc stream|unary] [--batch N] [--steps S] "
               "[--warmup W] [--repeats R] [--window K] [--clients C] [--shared-model 0|1] "
               "[--duration SECONDS] "
               "[--data X.f32 --labels Y.i64] [--model ID] [--spec MODEL.json]\n",
               why.c_str());
  std::exit(2);
}

Options Parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (i + 1 >= argc) Usage("missing value for " + flag);
    const char* v = argv[++i];
    if (flag == "--address") o.address = v;
    else if (flag == "--scenario") o.scenario = v;
    else if (flag == "--rpc") o.rpc = v;
    else if (flag == "--batch") o.batch = std::atoll(v);
    else if (flag == "--steps") o.steps = std::atoi(v);
    else if (flag == "--warmup") o.warmup = std::atoi(v);
    else if (flag == "--repeats") o.repeats = std::atoi(v);
    else if (flag == "--window") o.window = std::atoi(v);
    else if (flag == "--clients") o.clients = std::atoi(v);
    else if (flag == "--duration") o.duration = std::atof(v);
    else if (flag == "--shared-model") o.shared_model = std::string(v) == "1";
    else if (flag == "--data") o.data = v;
    else if (flag == "--labels") o.labels = v;
    else if (flag == "--model") o.model = v;
    else if (flag == "--spec") o.spec = v;
    else Usage("unknown flag " + flag);
  }
  if (o.batch < 1 || o.steps < 1 || o.repeats < 1 || o.warmup < 0 || o.window < 1 ||
      o.clients < 1 || o.clients > 64 || !(o.duration > 0.0 && o.duration <= 120.0)) {
    Usage("out-of-range value (clients 1..64, duration (0, 120] s)");
  }
  if (o.rpc != "stream" && o.rpc != "unary") Usage("--rpc is stream or unary");
  if (!o.spec.empty() && (o.scenario != "train" || o.data.empty() || o.labels.empty())) {
    Usage("--spec is for --scenario train, with --data and --labels");
  }
  return o;
}

// ---- Specs and data ----------------------------------------------------------------------------

v1::ModelSpec ToSpec(const ModelConfig& c) {
  v1::ModelSpec spec;
  for (int64_t d : c.input_shape) spec.add_input_shape(d);
  for (const LayerConfig& l : c.layers) {
    v1::LayerSpec* s = spec.add_layers();
    switch (l.kind) {
      case LayerKind::kLinear:
        s->mutable_linear()->set_in_features(l.linear.in_features);
        s->mutable_linear()->set_out_features(l.linear.out_features);
        break;
      case LayerKind::kBatchNorm1d:
        s->mutable_batch_norm1d()->set_num_features(l.batch_norm.num_features);
        break;
      case LayerKind::kReLU:
        s->mutable_relu();
        break;
      default:
        Usage("reference model with an unexpected layer kind");
    }
  }
  spec.set_loss(v1::LOSS_CROSS_ENTROPY);
  v1::SGDSpec* sgd = spec.mutable_optimizer()->mutable_sgd();
  sgd->set_lr(c.optimizer.sgd.lr);
  sgd->set_momentum(c.optimizer.sgd.momentum);
  spec.set_seed(c.seed);
  return spec;
}

v1::ModelSpec ReadSpec(const std::string& path) {
  std::ifstream in(path);
  if (!in) Usage("cannot open " + path);
  const std::string json((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  v1::ModelSpec spec;
  const auto status = google::protobuf::util::JsonStringToMessage(json, &spec);
  if (!status.ok()) Usage(path + " is not a ModelSpec: " + std::string(status.message()));
  return spec;
}

struct Dataset {
  int64_t features = 0;
  std::vector<float> x;
  std::vector<int64_t> y;
  int64_t rows() const { return static_cast<int64_t>(y.size()); }
};

template <typename T>
std::vector<T> ReadRaw(const std::string& path) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) Usage("cannot open " + path);
  const std::streamsize bytes = in.tellg();
  std::vector<T> v(bytes / sizeof(T));
  in.seekg(0);
  in.read(reinterpret_cast<char*>(v.data()), bytes);
  return v;
}

Dataset MakeData(int64_t features, int64_t classes, int64_t rows, uint64_t seed) {
  Dataset d;
  d.features = features;
  Rng rng(seed);
  d.x.resize(rows * features);
  for (float& v : d.x) v = rng.Uniform(-1.7f, 1.7f);
  d.y.resize(rows);
  for (int64_t& l : d.y) l = static_cast<int64_t>(rng.Next() % classes);
  return d;
}

// The batches of a dataset as (input view, labels) pairs, prepared before any timing.
struct Batch {
  const float* data;
  std::vector<int64_t> labels;
};

std::vector<Batch> Batches(const Dataset& d, int64_t batch) {
  std::vector<Batch> out;
  for (int64_t r = 0; r + batch <= d.rows(); r += batch) {
    out.push_back(Batch{d.x.data() + r * d.features,
                        std::vector<int64_t>(d.y.begin() + r, d.y.begin() + r + batch)});
  }
  if (out.empty()) Usage("the data holds less than one batch");
  return out;
}

std::string ModelId(const Options& o, int n) {
  return "bench-" + o.scenario + "-" + std::to_string(getpid()) + "-" + std::to_string(n);
}

client::ClientOptions ClientOpts(const Options& o) {
  client::ClientOptions c;
  c.server = o.address;
  c.timeout = std::chrono::seconds(60);
  return c;
}

// CPU time of this process (every thread).
double ProcessCpuSeconds() {
  timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

double Percentile(const std::vector<double>& sorted, double p) {
  if (sorted.empty()) return 0.0;
  const size_t i = std::min(sorted.size() - 1, static_cast<size_t>(p * sorted.size()));
  return sorted[i];
}

// ---- Scenarios ---------------------------------------------------------------------------------

int Ping(const Options& o) {
  client::ClientOptions co = ClientOpts(o);
  co.timeout = std::chrono::milliseconds(500);
  client::Client c(co);
  try {
    return c.Health() == grpc::health::v1::HealthCheckResponse::SERVING ? 0 : 1;
  } catch (const client::Error&) {
    return 1;
  }
}

int Delete(const Options& o) {
  if (o.model.empty()) Usage("delete needs --model");
  try {
    client::Client(ClientOpts(o)).DeleteModel(o.model);
  } catch (const client::Error& e) {
    std::fprintf(stderr, "normd_load: %s\n", e.what());
    return 1;
  }
  return 0;
}

int Train(const Options& o) {
  const v1::ModelSpec spec = o.spec.empty() ? ToSpec(ReferenceMlpConfig()) : ReadSpec(o.spec);
  std::vector<int64_t> shape = {o.batch};  // the batch's shape: (N, the spec's input shape)
  int64_t features = 1;
  for (int64_t d : spec.input_shape()) {
    if (d < 1) Usage("the spec's input shape has a dimension below 1");
    shape.push_back(d);
    features *= d;
  }
  Dataset data;
  if (o.data.empty()) {
    data = MakeData(kReferenceIn, kReferenceClasses, 8192, 11);
  } else {
    data.features = features;
    data.x = ReadRaw<float>(o.data);
    data.y = ReadRaw<int64_t>(o.labels);
    if (static_cast<int64_t>(data.x.size()) != data.rows() * features) {
      Usage("--data and --labels disagree on the row count");
    }
  }
  const std::vector<Batch> batches = Batches(data, o.batch);

  client::Client c(ClientOpts(o));
  const std::string id = o.model.empty() ? ModelId(o, 0) : o.model;
  size_t next = 0;
  double last_loss = 0.0;
  std::vector<double> rates, cpu_rates;

  // Runs `steps` steps and returns the elapsed seconds.
  auto run = [&](int steps) {
    const auto t0 = Clock::now();
    if (o.rpc == "unary") {
      for (int i = 0; i < steps; ++i) {
        const Batch& b = batches[next++ % batches.size()];
        last_loss = c.TrainStep(id, client::TensorView(b.data, shape), b.labels).loss();
      }
    } else {
      std::unique_ptr<client::TrainStream> stream = c.OpenTrainStream(id);
      for (int i = 0; i < steps; ++i) {
        const Batch& b = batches[next++ % batches.size()];
        stream->Write(client::TensorView(b.data, shape), b.labels);
        if (stream->pending() >= o.window) last_loss = stream->Read().loss();
      }
      for (const v1::TrainStepResponse& r : stream->Finish()) last_loss = r.loss();
    }
    return std::chrono::duration<double>(Clock::now() - t0).count();
  };

  try {
    if (o.model.empty()) {
      c.CreateModel(spec, id);
    } else {
      try {
        c.GetModel(id);
      } catch (const client::Error&) {
        c.CreateModel(spec, id);
      }
    }
    if (o.warmup > 0) run(o.warmup);
    for (int r = 0; r < o.repeats; ++r) {
      const double c0 = ProcessCpuSeconds();
      rates.push_back(o.steps * o.batch / run(o.steps));
      cpu_rates.push_back(o.steps * o.batch / std::max(1e-9, ProcessCpuSeconds() - c0));
    }
    if (o.model.empty()) c.DeleteModel(id);
  } catch (const client::Error& e) {
    std::fprintf(stderr, "normd_load: %s\n", e.what());
    return 1;
  }
  std::printf("{\"scenario\": \"train\", \"rpc\": \"%s\", \"batch\": %lld, \"samples_per_s\": [",
              o.rpc.c_str(), static_cast<long long>(o.batch));
  for (size_t i = 0; i < rates.size(); ++i) std::printf("%s%.1f", i ? ", " : "", rates[i]);
  std::printf("], \"client_cpu_samples_per_s\": [");
  for (size_t i = 0; i < cpu_rates.size(); ++i) std::printf("%s%.1f", i ? ", " : "", cpu_rates[i]);
  std::printf("], \"median\": %.1f, \"final_loss\": %.6f}\n", Median(rates), last_loss);
  return 0;
}

// N client threads issuing one kind of request for a fixed duration.
int Load(const Options& o) {
  const bool forward = o.scenario == "forward";
  const ModelConfig config = forward ? SmallModelConfig() : ReferenceMlpConfig();
  const int64_t features = config.input_shape[0];
  const int64_t batch = forward ? 1 : o.batch;
  const Dataset data = MakeData(features, 10, std::max<int64_t>(4096, 4 * batch), 13);
  const std::vector<Batch> batches = Batches(data, batch);
  const std::vector<int64_t> shape = {batch, features};

  // Models: one shared eval-mode model for forward (trained a few steps first so its running
  // statistics are not the initial ones), one model per client for trainload.
  client::Client admin(ClientOpts(o));
  std::vector<std::string> ids;
  try {
    if (forward) {
      ids.push_back(ModelId(o, 0));
      admin.CreateModel(ToSpec(config), ids[0]);
      const std::vector<Batch> warm = Batches(data, 64);
      for (int i = 0; i < 20; ++i) {
        const Batch& b = warm[i % warm.size()];
        admin.TrainStep(ids[0], client::TensorView(b.data, {64, features}), b.labels);
      }
      admin.SetMode(ids[0], v1::MODE_EVAL);
    } else {
      for (int i = 0; i < (o.shared_model ? 1 : o.clients); ++i) {
        ids.push_back(ModelId(o, i));
        admin.CreateModel(ToSpec(config), ids.back());
      }
    }
  } catch (const client::Error& e) {
    std::fprintf(stderr, "normd_load: setting up: %s\n", e.what());
    return 1;
  }

  std::atomic<bool> stop{false};
  std::atomic<int64_t> errors{0};
  std::mutex mu;
  std::string first_error;
  std::vector<std::vector<double>> latencies(o.clients);
  std::vector<std::thread> threads;
  for (int t = 0; t < o.clients; ++t) {
    threads.emplace_back([&, t] {
      client::Client c(ClientOpts(o));
      const std::string& id = ids.size() == 1 ? ids[0] : ids[t];
      std::vector<double>& lat = latencies[t];
      lat.reserve(1 << 16);
      size_t next = static_cast<size_t>(t) * 7;
      while (!stop.load(std::memory_order_relaxed)) {
        const Batch& b = batches[next++ % batches.size()];
        const auto t0 = Clock::now();
        try {
          if (forward) {
            c.Forward(id, client::TensorView(b.data, shape));
          } else {
            c.TrainStep(id, client::TensorView(b.data, shape), b.labels);
          }
        } catch (const client::Error& e) {
          errors.fetch_add(1);
          std::lock_guard<std::mutex> lock(mu);
          if (first_error.empty()) first_error = e.what();
          continue;
        }
        lat.push_back(std::chrono::duration<double, std::micro>(Clock::now() - t0).count());
      }
    });
  }
  const auto start = Clock::now();
  std::this_thread::sleep_for(std::chrono::duration<double>(o.duration));
  stop.store(true);
  for (std::thread& th : threads) th.join();
  const double elapsed = std::chrono::duration<double>(Clock::now() - start).count();

  for (const std::string& id : ids) {
    try {
      admin.DeleteModel(id);
    } catch (const client::Error&) {
    }
  }
  std::vector<double> all;
  for (const auto& l : latencies) all.insert(all.end(), l.begin(), l.end());
  std::sort(all.begin(), all.end());
  if (!first_error.empty()) std::fprintf(stderr, "normd_load: first error: %s\n",
                                         first_error.c_str());
  const double qps = static_cast<double>(all.size()) / elapsed;
  std::printf("{\"scenario\": \"%s\", \"clients\": %d, \"batch\": %lld, \"duration_s\": %.2f, "
              "\"requests\": %zu, \"errors\": %lld, \"qps\": %.1f, \"samples_per_s\": %.1f, "
              "\"p50_us\": %.1f, \"p90_us\": %.1f, \"p99_us\": %.1f}\n",
              o.scenario.c_str(), o.clients, static_cast<long long>(batch), elapsed, all.size(),
              static_cast<long long>(errors.load()), qps, qps * static_cast<double>(batch),
              Percentile(all, 0.50), Percentile(all, 0.90), Percentile(all, 0.99));
  return errors.load() == 0 ? 0 : 1;
}

}  // namespace
}  // namespace bench
}  // namespace normd

int main(int argc, char** argv) {
  const normd::bench::Options o = normd::bench::Parse(argc, argv);
  if (o.scenario == "ping") return normd::bench::Ping(o);
  if (o.scenario == "train") return normd::bench::Train(o);
  if (o.scenario == "delete") return normd::bench::Delete(o);
  if (o.scenario == "forward" || o.scenario == "trainload") return normd::bench::Load(o);
  normd::bench::Usage("unknown scenario " + o.scenario);
}
