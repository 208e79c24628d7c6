// normd_core_trainer: trains the reference MLP (bench/reference_models.h) in-process through
// Model::TrainStep and prints its throughput. compare_torch.py runs it next to PyTorch on the
// same data; it is also handy on its own.
//
// Usage: normd_core_trainer [--batch N] [--steps S] [--warmup W] [--repeats R] [--threads T]
//                           [--data X.f32 --labels Y.i64]
// Without --data, a deterministic random dataset of 8192 samples is generated. X.f32 holds
// M*784 little-endian float32 values (row-major), Y.i64 M int64 labels in [0, 10). Each step
// trains on the next batch of consecutive rows (wrapping around), viewed in place.
//
// Output (stdout), one JSON object:
//   {"batch": N, "threads": T, "samples_per_s": [r1, ..., rR],
//    "cpu_samples_per_s": [c1, ..., cR], "median": m, "final_loss": l}
// samples_per_s is per wall-clock second, cpu_samples_per_s per second of process CPU time.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "bench/reference_models.h"
#include "core/model.h"
#include "core/threads.h"

namespace normd {
namespace bench {
namespace {

struct Options {
  int64_t batch = 256;
  int steps = 50;
  int warmup = 10;
  int repeats = 5;
  int threads = 1;
  std::string data, labels;
};

[[noreturn]] void Usage(const char* why) {
  std::fprintf(stderr,
               "normd_core_trainer: %s\nusage: normd_core_trainer [--batch N] [--steps S] "
               "[--warmup W] [--repeats R] [--threads T] [--data X.f32 --labels Y.i64]\n",
               why);
  std::exit(2);
}

Options Parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (i + 1 >= argc) Usage(("missing value for " + flag).c_str());
    const char* v = argv[++i];
    if (flag == "--batch") o.batch = std::atoll(v);
    else if (flag == "--steps") o.steps = std::atoi(v);
    else if (flag == "--warmup") o.warmup = std::atoi(v);
    else if (flag == "--repeats") o.repeats = std::atoi(v);
    else if (flag == "--threads") o.threads = std::atoi(v);
    else if (flag == "--data") o.data = v;
    else if (flag == "--labels") o.labels = v;
    else Usage(("unknown flag " + flag).c_str());
  }
  if (o.batch < 2 || o.steps < 1 || o.repeats < 1 || o.warmup < 0 || o.threads < 1) {
    Usage("batch must be >= 2, steps and repeats >= 1, threads >= 1");
  }
  if (o.data.empty() != o.labels.empty()) Usage("--data and --labels go together");
  return o;
}

// CPU time of the whole process (every thread), for throughput per CPU-second: on a machine
// whose cores other jobs share, wall-clock rates measure the share as much as the code.
double ProcessCpuSeconds() {
  timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}

template <typename T>
std::vector<T> ReadRaw(const std::string& path) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) Usage(("cannot open " + path).c_str());
  const std::streamsize bytes = in.tellg();
  if (bytes % static_cast<std::streamsize>(sizeof(T)) != 0) {
    Usage((path + " has a size that is not a whole number of values").c_str());
  }
  std::vector<T> v(bytes / sizeof(T));
  in.seekg(0);
  in.read(reinterpret_cast<char*>(v.data()), bytes);
  return v;
}

}  // namespace
}  // namespace bench
}  // namespace normd

int main(int argc, char** argv) {
  using namespace normd;
  using namespace normd::bench;
  const Options opt = Parse(argc, argv);
  SetComputeThreads(opt.threads);

  std::vector<float> x;
  std::vector<int64_t> y;
  if (opt.data.empty()) {
    const int64_t m = 8192;
    Rng rng(11);
    x.resize(m * kReferenceIn);
    for (float& v : x) v = rng.Uniform(-1.7f, 1.7f);
    y.resize(m);
    for (int64_t& l : y) l = static_cast<int64_t>(rng.Next() % kReferenceClasses);
  } else {
    x = ReadRaw<float>(opt.data);
    y = ReadRaw<int64_t>(opt.labels);
  }
  const int64_t m = static_cast<int64_t>(y.size());
  if (static_cast<int64_t>(x.size()) != m * kReferenceIn || m < opt.batch) {
    Usage("the data must hold at least one batch of 784-feature rows, one label per row");
  }

  std::unique_ptr<Model> model;
  Status s = Model::Create(ReferenceMlpConfig(), Sequential::Limits(), &model);
  if (!s.ok()) Usage(s.message().c_str());

  ForwardRecord rec;
  TrainResult result;
  int64_t next = 0;
  auto step = [&] {
    if (next + opt.batch > m) next = 0;
    ConstTensorView view{x.data() + next * kReferenceIn, Shape{opt.batch, kReferenceIn}};
    Targets t;
    t.labels = y.data() + next;
    t.num_labels = opt.batch;
    next += opt.batch;
    Status st = model->TrainStep(view, t, &rec, &result);
    if (!st.ok()) {
      std::fprintf(stderr, "normd_core_trainer: %s\n", st.message().c_str());
      std::exit(1);
    }
  };

  for (int i = 0; i < opt.warmup; ++i) step();
  std::vector<double> rates, cpu_rates;
  const int64_t splits_before = internal::SplitsDone();
  for (int r = 0; r < opt.repeats; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    const double c0 = ProcessCpuSeconds();
    for (int i = 0; i < opt.steps; ++i) step();
    const double dt =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const double samples = static_cast<double>(opt.steps * opt.batch);
    rates.push_back(samples / dt);
    cpu_rates.push_back(samples / std::max(1e-9, ProcessCpuSeconds() - c0));
  }
  std::vector<double> sorted = rates;
  std::sort(sorted.begin(), sorted.end());
  const double median = sorted[sorted.size() / 2];

  std::printf("{\"batch\": %lld, \"threads\": %d, \"threads_effective\": %d, \"samples_per_s\": [",
              static_cast<long long>(opt.batch), opt.threads, ComputeThreads());
  for (size_t i = 0; i < rates.size(); ++i) std::printf("%s%.1f", i ? ", " : "", rates[i]);
  std::printf("], \"cpu_samples_per_s\": [");
  for (size_t i = 0; i < cpu_rates.size(); ++i) std::printf("%s%.1f", i ? ", " : "", cpu_rates[i]);
  // How many operations ran on two cores per timed step (0 at budget 1; below the number of
  // splittable operations when the second core was busy and SplitInTwo backed off).
  const double splits_per_step = static_cast<double>(internal::SplitsDone() - splits_before) /
                                 static_cast<double>(opt.repeats * opt.steps);
  std::printf("], \"median\": %.1f, \"splits_per_step\": %.2f, \"final_loss\": %.6f}\n", median,
              splits_per_step, result.loss);
  return 0;
}
