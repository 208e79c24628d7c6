// `normctl demo`: BatchNorm drift detection, told in about a minute.
//
// Trains an MLP with BatchNorm on Gaussian blobs, switches it to eval mode, serves predictions on
// data from the training distribution and then on shifted data, and shows the shift in the
// BatchNorm drift figures, both from the Model message and from the server's /metrics.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <map>
#include <random>

#include "client/normctl/commands.h"
#include "client/normctl/csv.h"
#include "client/normctl/metrics_scrape.h"
#include "client/normctl/table.h"
#include "client/normctl/train.h"

namespace normctl {
namespace {

namespace v1 = normd::v1;
using normd::client::Client;

constexpr int kFeatures = 8;
constexpr int kClasses = 4;
constexpr int kServeBatch = 64;
constexpr int kServeBatches = 16;
// The shift applied to served inputs: an upstream change of units and offset.
constexpr float kShiftScale = 1.5f;
constexpr float kShiftOffset = 2.0f;

struct Blobs {
  std::vector<float> x;  // n * kFeatures
  std::vector<float> y;  // n labels
};

class BlobSource {
 public:
  explicit BlobSource(uint64_t seed) : rng_(seed) {
    std::normal_distribution<float> center(0.0f, 2.0f);
    for (auto& c : centers_) {
      for (float& v : c) v = center(rng_);
    }
  }
  Blobs Sample(int64_t n) {
    Blobs b;
    std::uniform_int_distribution<int> cls(0, kClasses - 1);
    std::normal_distribution<float> noise(0.0f, 1.0f);
    for (int64_t i = 0; i < n; ++i) {
      const int c = cls(rng_);
      for (int f = 0; f < kFeatures; ++f) b.x.push_back(centers_[c][f] + noise(rng_));
      b.y.push_back(static_cast<float>(c));
    }
    return b;
  }

 private:
  std::mt19937_64 rng_;
  float centers_[kClasses][kFeatures];
};

v1::ModelSpec DemoSpec() {
  v1::ModelSpec spec;
  spec.add_input_shape(kFeatures);
  auto linear = [&](const char* name, int in, int out) {
    v1::LayerSpec* l = spec.add_layers();
    l->set_name(name);
    l->mutable_linear()->set_in_features(in);
    l->mutable_linear()->set_out_features(out);
  };
  auto batch_norm = [&](const char* name, int features) {
    v1::LayerSpec* l = spec.add_layers();
    l->set_name(name);
    l->mutable_batch_norm1d()->set_num_features(features);
  };
  auto relu = [&](const char* name) {
    v1::LayerSpec* l = spec.add_layers();
    l->set_name(name);
    l->mutable_relu();
  };
  linear("fc1", kFeatures, 64);
  batch_norm("bn1", 64);
  relu("relu1");
  linear("fc2", 64, 32);
  batch_norm("bn2", 32);
  relu("relu2");
  linear("out", 32, kClasses);
  spec.set_loss(v1::LOSS_CROSS_ENTROPY);
  spec.mutable_optimizer()->mutable_adam()->set_lr(0.005f);
  spec.set_seed(7);
  return spec;
}

void WriteBlobs(const std::string& path, const Blobs& b) {
  std::ofstream out(path);
  std::vector<std::string> header;
  for (int f = 0; f < kFeatures; ++f) header.push_back("x" + std::to_string(f));
  header.push_back("label");
  std::vector<float> rows;
  const int64_t n = static_cast<int64_t>(b.y.size());
  for (int64_t i = 0; i < n; ++i) {
    rows.insert(rows.end(), b.x.begin() + i * kFeatures, b.x.begin() + (i + 1) * kFeatures);
    rows.push_back(b.y[i]);
  }
  WriteCsv(out, header, rows.data(), n, kFeatures + 1);
  if (!out) throw InputError("cannot write '" + path + "'");
}

// Drift figures per BatchNorm layer for one serving phase.
struct LayerDrift {
  double last_mean_shift = NAN;  // Model.batch_norms, the phase's last batch
  double last_var_log_ratio = NAN;
  double avg_mean_shift = NAN;  // /metrics: mean over the phase's batches
  double avg_var_log_ratio = NAN;
};

class MetricsReader {
 public:
  MetricsReader(std::string url, std::string model)
      : url_(std::move(url)), model_(std::move(model)) {}

  // Scrapes now; returns false (after one warning) when /metrics cannot be read.
  bool Scrape(std::vector<MetricSample>* out) {
    if (url_.empty() || failed_) return false;
    try {
      *out = ParseMetrics(HttpGet(url_, std::chrono::seconds(5)));
      return true;
    } catch (const InputError& e) {
      std::cerr << "normctl: warning: " << e.what() << "; showing the Model's figures only\n";
      failed_ = true;
      return false;
    }
  }

  // Mean of histogram `name` over the observations between two scrapes, in eval mode.
  double WindowMean(const std::vector<MetricSample>& before, const std::vector<MetricSample>& after,
                    const std::string& name, const std::string& layer) const {
    const std::map<std::string, std::string> match{
        {"model", model_}, {"layer", layer}, {"mode", "eval"}};
    const double count =
        SumMetric(after, name + "_count", match) - SumMetric(before, name + "_count", match);
    const double sum =
        SumMetric(after, name + "_sum", match) - SumMetric(before, name + "_sum", match);
    return count > 0 ? sum / count : NAN;
  }

 private:
  std::string url_;
  std::string model_;
  bool failed_ = false;
};

// Serves `data` in eval mode batch by batch (Forward); returns the accuracy and fills `drift`.
double Serve(Client& client, const std::string& id, const Blobs& data, MetricsReader& metrics,
             std::map<std::string, LayerDrift>* drift) {
  std::vector<MetricSample> before, after;
  const bool scraped = metrics.Scrape(&before);
  int64_t correct = 0;
  const int64_t n = static_cast<int64_t>(data.y.size());
  for (int64_t begin = 0; begin < n; begin += kServeBatch) {
    const int64_t count = std::min<int64_t>(kServeBatch, n - begin);
    const normd::client::Tensor y =
        client
            .Forward(id, normd::client::TensorView(data.x.data() + begin * kFeatures,
                                                   {count, kFeatures}))
            .output;
    for (int64_t i = 0; i < count; ++i) {
      const float* row = y.values.data() + i * kClasses;
      correct +=
          (std::max_element(row, row + kClasses) - row) == static_cast<int>(data.y[begin + i]);
    }
  }
  const v1::Model model = client.GetModel(id);
  const bool have_after = scraped && metrics.Scrape(&after);
  for (const v1::BatchNormStatus& bn : model.batch_norms()) {
    LayerDrift& d = (*drift)[bn.layer()];
    d.last_mean_shift = bn.last_mean_shift();
    d.last_var_log_ratio = bn.last_var_log_ratio();
    if (have_after) {
      d.avg_mean_shift = metrics.WindowMean(before, after, "normd_bn_mean_shift", bn.layer());
      d.avg_var_log_ratio = metrics.WindowMean(before, after, "normd_bn_var_log_ratio", bn.layer());
    }
  }
  return static_cast<double>(correct) / std::max<int64_t>(n, 1);
}

std::string Cell(double v) { return std::isnan(v) ? "n/a" : Fixed(v, 3); }
std::string Ratio(double base, double shifted) {
  if (std::isnan(base) || std::isnan(shifted) || base <= 0) return "";
  return Fixed(shifted / base, 1) + "x";
}

void Heading(std::ostream& out, int step, const std::string& text) {
  out << "\n[" << step << "/7] " << text << '\n';
}

}  // namespace

int RunDemo(Client& client, const Args& args, std::ostream& out) {
  const auto started = std::chrono::steady_clock::now();
  const std::string id = args.id.empty() ? "demo" : args.id;
  const std::string server = client.options().server;
  out << "normd demo: BatchNorm networks trained over gRPC, and input drift seen through "
         "BatchNorm\n"
      << "server " << server << " is "
      << grpc::health::v1::HealthCheckResponse::ServingStatus_Name(client.Health()) << '\n';

  Heading(out, 1, "Create an MLP with BatchNorm");
  v1::Model model;
  try {
    model = client.CreateModel(DemoSpec(), id);
  } catch (const normd::client::Error& e) {
    if (e.code() != grpc::StatusCode::ALREADY_EXISTS) throw;
    out << "  model " << id << " exists from an earlier run: replacing it\n";
    client.DeleteModel(id);
    model = client.CreateModel(DemoSpec(), id);
  }
  out << "  " << id << ": [" << kFeatures
      << "] -> Linear 64 -> BatchNorm1d -> ReLU -> Linear 32 -> "
      << "BatchNorm1d -> ReLU -> Linear " << kClasses << "  (" << model.parameter_count()
      << " parameters, cross-entropy, Adam lr 0.005)\n";

  Heading(out, 2,
          "Generate data: " + std::to_string(kClasses) + " Gaussian blobs in " +
              std::to_string(kFeatures) + " dimensions");
  BlobSource source(2024);
  const Blobs train = source.Sample(args.samples);
  const Blobs test = source.Sample(std::max<int64_t>(args.samples / 5, 200));
  const Blobs serve = source.Sample(kServeBatch * kServeBatches);
  Blobs shifted = source.Sample(kServeBatch * kServeBatches);
  for (float& v : shifted.x) v = kShiftScale * v + kShiftOffset;
  out << "  " << train.y.size() << " training, " << test.y.size() << " test samples; "
      << serve.y.size() << " to serve as they are, " << shifted.y.size() << " shifted (x * "
      << kShiftScale << " + " << kShiftOffset << ", as when an upstream "
      << "feature pipeline changes units)\n";
  if (!args.out_dir.empty()) {
    WriteBlobs(args.out_dir + "/train.csv", train);
    WriteBlobs(args.out_dir + "/test.csv", test);
    WriteBlobs(args.out_dir + "/shifted.csv", shifted);
    out << "  written to " << args.out_dir << "/{train,test,shifted}.csv\n";
  }

  Heading(out, 3,
          "Train: " + std::to_string(args.demo_epochs) +
              " epochs of batch 64, streamed over TrainStream");
  TrainOptions options;
  options.epochs = args.demo_epochs;
  options.batch = 64;
  options.shuffle = true;
  options.progress = ParseProgressStyle(args.progress);
  Train(client, id, MakeDataset(model, train.x, train.y), nullptr, options, out);
  const EvalSummary test_result =
      EvaluateDataset(client, id, MakeDataset(model, test.x, test.y), 4096);
  out << "  test accuracy " << Fixed(100 * test_result.accuracy, 2) << "%, loss "
      << Fixed(test_result.loss, 4) << '\n';

  Heading(out, 4, "Switch to eval mode: BatchNorm now normalises with its running statistics");
  model = client.SetMode(id, v1::MODE_EVAL);
  out << "  " << id << " is in " << ModeName(model.mode()) << " mode at step " << model.step()
      << '\n';

  MetricsReader metrics(args.metrics_url, id);
  std::map<std::string, LayerDrift> base, drifted;
  Heading(out, 5,
          "Serve predictions on data like the training data (" + std::to_string(kServeBatches) +
              " Forward calls of " + std::to_string(kServeBatch) + ")");
  const double base_accuracy = Serve(client, id, serve, metrics, &base);
  out << "  accuracy " << Fixed(100 * base_accuracy, 2) << "%\n";

  Heading(out, 6, "Serve predictions on shifted data (same count)");
  const double shifted_accuracy = Serve(client, id, shifted, metrics, &drifted);
  out << "  accuracy " << Fixed(100 * shifted_accuracy, 2)
      << "%  (the labels are known here; in production they are not, but the drift is visible)\n";

  Heading(out, 7, "Drift per BatchNorm layer, in-distribution vs shifted");
  out << "  mean shift    = mean over channels of |batch mean - running mean| / sqrt(running var + "
         "eps)\n"
      << "  var log ratio = mean over channels of |ln((batch var + eps) / (running var + eps))|\n"
      << "  Model: GetModel's batch_norms (last batch); /metrics: normd_bn_*{mode=\"eval\"} "
         "_sum/_count over the phase\n\n";
  TextTable table({"layer", "figure", "source", "in-distribution", "shifted", "change"});
  std::vector<std::string> flagged;
  for (const v1::BatchNormStatus& bn : model.batch_norms()) {
    const LayerDrift& b = base[bn.layer()];
    const LayerDrift& s = drifted[bn.layer()];
    table.AddRow({bn.layer(), "mean shift", "Model", Cell(b.last_mean_shift),
                  Cell(s.last_mean_shift), Ratio(b.last_mean_shift, s.last_mean_shift)});
    table.AddRow({bn.layer(), "mean shift", "/metrics", Cell(b.avg_mean_shift),
                  Cell(s.avg_mean_shift), Ratio(b.avg_mean_shift, s.avg_mean_shift)});
    table.AddRow({bn.layer(), "var log ratio", "Model", Cell(b.last_var_log_ratio),
                  Cell(s.last_var_log_ratio), Ratio(b.last_var_log_ratio, s.last_var_log_ratio)});
    table.AddRow({bn.layer(), "var log ratio", "/metrics", Cell(b.avg_var_log_ratio),
                  Cell(s.avg_var_log_ratio), Ratio(b.avg_var_log_ratio, s.avg_var_log_ratio)});
    const double before = std::isnan(b.avg_mean_shift) ? b.last_mean_shift : b.avg_mean_shift;
    const double after = std::isnan(s.avg_mean_shift) ? s.last_mean_shift : s.avg_mean_shift;
    if (after > 0.5 && after > 3 * before) flagged.push_back(bn.layer());
  }
  table.Print(out, "  ");
  out << '\n';
  if (flagged.empty()) {
    out << "  no layer crossed the drift threshold (mean shift > 0.5 and > 3x its "
           "in-distribution level)\n";
  } else {
    out << "  DRIFT DETECTED at";
    for (const auto& l : flagged) out << ' ' << l;
    out << ": mean shift above 0.5 and more than 3x its in-distribution level.\n"
        << "  Accuracy fell from " << Fixed(100 * base_accuracy, 1) << "% to "
        << Fixed(100 * shifted_accuracy, 1)
        << "%; the drift figures need no labels to see it coming.\n";
  }

  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  out << "\nDone in " << Fixed(seconds, 1) << " s. Where to look next:\n";
  if (!args.metrics_url.empty()) {
    out << "  metrics      curl -s " << args.metrics_url << " | grep normd_bn_\n";
  }
  const std::string ctl = "normctl --server " + server;
  out << "  the model    " << ctl << " get " << id << '\n';
  if (!args.out_dir.empty()) {
    out << "  activations  " << ctl << " inspect " << id << " --data " << args.out_dir
        << "/shifted.csv --label-column label\n"
        << "  evaluate     " << ctl << " eval " << id << " --data " << args.out_dir
        << "/shifted.csv\n";
  }
  out << "  adapt        " << ctl << " reset-stats " << id << "  (then re-estimate the statistics "
      << "on new data in train mode, or retrain)\n"
      << "  all commands normctl --help\n";
  return kExitOk;
}

}  // namespace normctl
