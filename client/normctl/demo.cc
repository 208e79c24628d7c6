// `normctl demo`: BatchNorm drift detection, told in about a minute.
//
// Trains an MLP with BatchNorm on Gaussian blobs, switches it to eval mode, serves live
// prediction traffic drawn from the training distribution and then shifted traffic, and shows
// the shift in the BatchNorm drift figures, both from the Model message and from /metrics;
// then re-estimates the statistics on unlabelled shifted data (AdaptStatistics) and serves the
// shifted traffic again.
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <map>
#include <random>
#include <thread>

#include "client/normctl/commands.h"
#include "client/normctl/csv.h"
#include "client/normctl/metrics_scrape.h"
#include "client/normctl/table.h"
#include "client/normctl/train.h"

namespace normctl {
namespace {

namespace v1 = normd::v1;
using normd::client::Client;
using Clock = std::chrono::steady_clock;

constexpr int kFeatures = 8;
constexpr int kClasses = 4;
constexpr int kHidden1 = 128;
constexpr int kHidden2 = 64;
constexpr int kServeBatch = 32;
// Live traffic: one Forward of kServeBatch samples every kServePeriod.
constexpr auto kServePeriod = std::chrono::milliseconds(40);
// The shift applied to served inputs: an upstream change of units and offset.
constexpr float kShiftScale = 1.5f;
constexpr float kShiftOffset = 1.5f;
// A layer is flagged when its eval-mode mean shift exceeds both.
constexpr double kDriftAbsolute = 0.5;
constexpr double kDriftRelative = 3.0;

struct Blobs {
  std::vector<float> x;  // n * kFeatures
  std::vector<float> y;  // n labels
};

class BlobSource {
 public:
  explicit BlobSource(uint64_t seed) : rng_(seed) {
    std::normal_distribution<float> center(0.0f, 1.6f);
    for (auto& c : centers_) {
      for (float& v : c) v = center(rng_);
    }
  }
  Blobs Sample(int64_t n, bool shifted = false) {
    Blobs b;
    std::uniform_int_distribution<int> cls(0, kClasses - 1);
    std::normal_distribution<float> noise(0.0f, 1.0f);
    for (int64_t i = 0; i < n; ++i) {
      const int c = cls(rng_);
      for (int f = 0; f < kFeatures; ++f) {
        const float v = centers_[c][f] + noise(rng_);
        b.x.push_back(shifted ? kShiftScale * v + kShiftOffset : v);
      }
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
  auto add = [&](const char* name) {
    v1::LayerSpec* l = spec.add_layers();
    l->set_name(name);
    return l;
  };
  auto linear = [&](const char* name, int in, int out) {
    v1::LinearSpec* s = add(name)->mutable_linear();
    s->set_in_features(in);
    s->set_out_features(out);
  };
  linear("fc1", kFeatures, kHidden1);
  add("bn1")->mutable_batch_norm1d()->set_num_features(kHidden1);
  add("relu1")->mutable_relu();
  linear("fc2", kHidden1, kHidden2);
  add("bn2")->mutable_batch_norm1d()->set_num_features(kHidden2);
  add("relu2")->mutable_relu();
  linear("out", kHidden2, kClasses);
  spec.set_loss(v1::LOSS_CROSS_ENTROPY);
  spec.mutable_optimizer()->mutable_adam()->set_lr(0.002f);
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
  double last_mean_shift = NAN;  // Model.batch_norms: the phase's last batch
  double last_var_log_ratio = NAN;
  double avg_mean_shift = NAN;  // /metrics: mean over the phase's batches
  double avg_var_log_ratio = NAN;
};

class MetricsReader {
 public:
  MetricsReader(std::string url, std::string model)
      : url_(std::move(url)), model_(std::move(model)) {}

  bool enabled() const { return !url_.empty() && !failed_; }

  // Scrapes now; returns false (after one warning) when /metrics cannot be read.
  bool Scrape(std::vector<MetricSample>* out) {
    if (!enabled()) return false;
    try {
      *out = ParseMetrics(HttpGet(url_, std::chrono::seconds(5)));
      return true;
    } catch (const InputError& e) {
      std::cerr << "normctl: warning: " << e.what() << "; showing the Model's figures only\n";
      failed_ = true;
      return false;
    }
  }

  // Mean of eval-mode histogram `name` over the observations between two scrapes.
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

bool StdoutIsTerminal() { return isatty(STDOUT_FILENO); }

std::string Cell(double v) { return std::isnan(v) ? "n/a" : Fixed(v, 3); }
std::string Ratio(double base, double shifted) {
  if (std::isnan(base) || std::isnan(shifted) || base <= 0) return "";
  return Fixed(shifted / base, 1) + "x";
}

// Serves live eval-mode traffic for `seconds`: a Forward of kServeBatch fresh samples every
// kServePeriod, with a status line showing requests, accuracy and the drift of every BatchNorm
// layer so far. Returns the accuracy; fills `drift` per layer.
double ServeLive(Client& client, const std::string& id, BlobSource& source, bool shifted,
                 double seconds, const std::vector<std::string>& layers, MetricsReader& metrics,
                 ProgressStyle style, std::ostream& out, std::map<std::string, LayerDrift>* drift) {
  if (style == ProgressStyle::kAuto) {
    style = StdoutIsTerminal() ? ProgressStyle::kBar : ProgressStyle::kLines;
  }
  std::vector<MetricSample> before, now;
  const bool scraped = metrics.Scrape(&before);
  const auto start = Clock::now();
  auto next = start;
  auto last_report = start;
  int64_t requests = 0, correct = 0, served = 0;
  bool drawn = false;

  auto report = [&](bool final_line) {
    std::string line = "  " + std::to_string(requests) + " requests  accuracy " +
                       Fixed(100.0 * correct / std::max<int64_t>(served, 1), 1) + "%  mean shift";
    if (scraped && metrics.Scrape(&now)) {
      for (const auto& l : layers) {
        line += "  " + l + " " + Cell(metrics.WindowMean(before, now, "normd_bn_mean_shift", l));
      }
    } else {
      const v1::Model m = client.GetModel(id);
      for (const auto& bn : m.batch_norms()) {
        line += "  " + bn.layer() + " " + Cell(bn.last_mean_shift());
      }
    }
    if (style == ProgressStyle::kBar) {
      out << '\r' << line << "   " << (final_line ? "\n" : "") << std::flush;
      drawn = !final_line;
    } else if (style == ProgressStyle::kLines || final_line) {
      out << line << '\n' << std::flush;
    }
  };

  do {
    const Blobs batch = source.Sample(kServeBatch, shifted);
    const normd::client::Tensor y =
        client.Forward(id, normd::client::TensorView(batch.x.data(), {kServeBatch, kFeatures}))
            .output;
    for (int64_t i = 0; i < kServeBatch; ++i) {
      const float* row = y.values.data() + i * kClasses;
      correct += (std::max_element(row, row + kClasses) - row) == static_cast<int>(batch.y[i]);
    }
    served += kServeBatch;
    ++requests;
    const auto t = Clock::now();
    const auto interval = style == ProgressStyle::kBar ? std::chrono::milliseconds(250)
                                                       : std::chrono::milliseconds(2000);
    if (style != ProgressStyle::kOff && t - last_report >= interval) {
      report(false);
      last_report = t;
    }
    next += kServePeriod;
    std::this_thread::sleep_until(next);
  } while (Clock::now() - start < std::chrono::duration<double>(seconds));
  if (drawn) out << '\r' << std::string(100, ' ') << '\r';
  report(true);

  const v1::Model model = client.GetModel(id);
  std::vector<MetricSample> after;
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
  return static_cast<double>(correct) / std::max<int64_t>(served, 1);
}

class Story {
 public:
  Story(std::ostream& out, bool pause) : out_(out), pause_(pause) {}
  void Step(int step, const std::string& text) {
    if (pause_ && step > 1) std::this_thread::sleep_for(std::chrono::milliseconds(1200));
    out_ << "\n[" << step << "/8] " << text << '\n' << std::flush;
  }

 private:
  std::ostream& out_;
  bool pause_;
};

}  // namespace

int RunDemo(Client& client, const Args& args, std::ostream& out) {
  const auto started = Clock::now();
  const std::string id = args.id.empty() ? "demo" : args.id;
  const std::string server = client.options().server;
  const ProgressStyle style = ParseProgressStyle(args.progress);
  // Pauses between steps give a reader on a terminal time to follow; logs get none.
  Story story(
      out, style == ProgressStyle::kBar || (style == ProgressStyle::kAuto && StdoutIsTerminal()));
  out << "normd demo: BatchNorm networks trained over gRPC, and input drift seen through "
         "BatchNorm\n"
      << "server " << server << " is "
      << grpc::health::v1::HealthCheckResponse::ServingStatus_Name(client.Health()) << '\n';

  story.Step(1, "Create an MLP with BatchNorm");
  v1::Model model;
  try {
    model = client.CreateModel(DemoSpec(), id);
  } catch (const normd::client::Error& e) {
    if (e.code() != grpc::StatusCode::ALREADY_EXISTS) throw;
    out << "  model " << id << " exists from an earlier run: replacing it\n";
    client.DeleteModel(id);
    model = client.CreateModel(DemoSpec(), id);
  }
  out << "  " << id << ": [" << kFeatures << "] -> Linear " << kHidden1
      << " -> BatchNorm1d -> ReLU -> Linear " << kHidden2 << " -> BatchNorm1d -> ReLU -> Linear "
      << kClasses << "\n  " << model.parameter_count()
      << " parameters, cross-entropy loss, Adam lr 0.002\n";
  std::vector<std::string> bn_layers;
  for (const auto& bn : model.batch_norms()) bn_layers.push_back(bn.layer());

  story.Step(2, "Generate data: " + std::to_string(kClasses) + " overlapping Gaussian blobs in " +
                    std::to_string(kFeatures) + " dimensions");
  BlobSource source(2024);
  const Blobs train = source.Sample(args.samples);
  const Blobs test = source.Sample(std::max<int64_t>(args.samples / 5, 200));
  out << "  " << train.y.size() << " training and " << test.y.size() << " test samples\n";
  if (!args.out_dir.empty()) {
    WriteBlobs(args.out_dir + "/train.csv", train);
    WriteBlobs(args.out_dir + "/test.csv", test);
    WriteBlobs(args.out_dir + "/shifted.csv", source.Sample(1000, true));
    out << "  written to " << args.out_dir << "/{train,test,shifted}.csv\n";
  }

  story.Step(3, "Train: " + std::to_string(args.demo_epochs) +
                    " epochs of batch 64, streamed over TrainStream");
  TrainOptions options;
  options.epochs = args.demo_epochs;
  options.batch = 64;
  options.shuffle = true;
  options.progress = style;
  Train(client, id, MakeDataset(model, train.x, train.y), nullptr, options, out);
  const EvalSummary test_result =
      EvaluateDataset(client, id, MakeDataset(model, test.x, test.y), 4096);
  out << "  test accuracy " << Fixed(100 * test_result.accuracy, 2) << "%, loss "
      << Fixed(test_result.loss, 4) << '\n';

  story.Step(4, "Switch to eval mode: BatchNorm now normalises with its running statistics");
  model = client.SetMode(id, v1::MODE_EVAL);
  out << "  " << id << " is in " << ModeName(model.mode()) << " mode at step " << model.step()
      << "; each BatchNorm layer compares every batch it sees with those statistics\n";

  MetricsReader metrics(args.metrics_url, id);
  std::map<std::string, LayerDrift> base, drifted;
  const std::string traffic = std::to_string(kServeBatch) + " samples every " +
                              std::to_string(kServePeriod.count()) + " ms for " +
                              Fixed(args.serve_seconds, 0) + " s";
  story.Step(5, "Serve predictions on live traffic like the training data (" + traffic + ")");
  const double base_accuracy = ServeLive(client, id, source, false, args.serve_seconds, bn_layers,
                                         metrics, style, out, &base);

  story.Step(6, "The upstream pipeline changes: inputs now arrive as x * " + Fixed(kShiftScale, 1) +
                    " + " + Fixed(kShiftOffset, 1) + " (" + traffic + ")");
  const double shifted_accuracy = ServeLive(client, id, source, true, args.serve_seconds, bn_layers,
                                            metrics, style, out, &drifted);

  story.Step(7, "Drift per BatchNorm layer, in-distribution vs shifted traffic");
  out << "  mean shift    = mean over channels of |batch mean - running mean| / sqrt(running var "
         "+ eps)\n"
      << "  var log ratio = mean over channels of |ln((batch var + eps) / (running var + eps))|\n"
      << "  Model: GetModel's batch_norms (the last batch); /metrics: normd_bn_*{mode=\"eval\"} "
         "_sum/_count over each phase\n\n";
  TextTable table({"layer", "figure", "source", "in-distribution", "shifted", "change"});
  std::vector<std::string> flagged;
  for (const std::string& layer : bn_layers) {
    const LayerDrift& b = base[layer];
    const LayerDrift& s = drifted[layer];
    table.AddRow({layer, "mean shift", "Model", Cell(b.last_mean_shift), Cell(s.last_mean_shift),
                  Ratio(b.last_mean_shift, s.last_mean_shift)});
    table.AddRow({layer, "mean shift", "/metrics", Cell(b.avg_mean_shift), Cell(s.avg_mean_shift),
                  Ratio(b.avg_mean_shift, s.avg_mean_shift)});
    table.AddRow({layer, "var log ratio", "Model", Cell(b.last_var_log_ratio),
                  Cell(s.last_var_log_ratio), Ratio(b.last_var_log_ratio, s.last_var_log_ratio)});
    table.AddRow({layer, "var log ratio", "/metrics", Cell(b.avg_var_log_ratio),
                  Cell(s.avg_var_log_ratio), Ratio(b.avg_var_log_ratio, s.avg_var_log_ratio)});
    const double before = std::isnan(b.avg_mean_shift) ? b.last_mean_shift : b.avg_mean_shift;
    const double after = std::isnan(s.avg_mean_shift) ? s.last_mean_shift : s.avg_mean_shift;
    if (after > kDriftAbsolute && after > kDriftRelative * before) flagged.push_back(layer);
  }
  table.Print(out, "  ");
  out << '\n';
  if (flagged.empty()) {
    out << "  no layer crossed the drift threshold (mean shift > " << kDriftAbsolute << " and > "
        << kDriftRelative << "x its in-distribution level)\n";
  } else {
    out << "  DRIFT DETECTED at";
    for (const auto& l : flagged) out << ' ' << l;
    out << ": eval-mode mean shift above " << kDriftAbsolute << " and more than " << kDriftRelative
        << "x its in-distribution level.\n"
        << "  Accuracy fell from " << Fixed(100 * base_accuracy, 1) << "% to "
        << Fixed(100 * shifted_accuracy, 1)
        << "%: only the demo knows the labels; the drift figures need none.\n";
  }

  story.Step(8, "Close the loop: re-estimate the BatchNorm statistics from unlabelled shifted "
                "data (AdaptStatistics), then serve shifted traffic again");
  constexpr int64_t kAdaptSamples = 2000, kAdaptBatch = 200;
  const Blobs recent = source.Sample(kAdaptSamples, true);  // the labels are not sent
  std::vector<normd::client::TensorView> batches;
  for (int64_t begin = 0; begin < kAdaptSamples; begin += kAdaptBatch) {
    batches.emplace_back(recent.x.data() + begin * kFeatures,
                         std::vector<int64_t>{kAdaptBatch, kFeatures});
  }
  client.AdaptStatistics(id, batches);
  out << "  streamed " << kAdaptSamples << " unlabelled shifted samples in " << batches.size()
      << " batches: every BatchNorm's running mean and variance are now those of the new data "
         "(weights untouched)\n";
  std::map<std::string, LayerDrift> adapted;
  const double adapted_accuracy = ServeLive(client, id, source, true, args.serve_seconds,
                                            bn_layers, metrics, style, out, &adapted);
  TextTable after({"layer", "mean shift: shifted", "adapted", "var log ratio: shifted",
                   "adapted"});
  for (const std::string& layer : bn_layers) {
    const LayerDrift& s = drifted[layer];
    const LayerDrift& a = adapted[layer];
    after.AddRow({layer, Cell(s.last_mean_shift), Cell(a.last_mean_shift),
                  Cell(s.last_var_log_ratio), Cell(a.last_var_log_ratio)});
  }
  out << '\n';
  after.Print(out, "  ");
  out << "\n  Accuracy on shifted traffic: " << Fixed(100 * shifted_accuracy, 1) << "% before, "
      << Fixed(100 * adapted_accuracy, 1) << "% after adapting (in-distribution: "
      << Fixed(100 * base_accuracy, 1) << "%).\n";

  const double seconds = std::chrono::duration<double>(Clock::now() - started).count();
  const std::string ctl = "normctl --server " + server;
  out << "\nDone in " << Fixed(seconds, 1) << " s. Where to look next:\n";
  if (!args.metrics_url.empty()) {
    out << "  metrics      curl -s " << args.metrics_url << " | grep normd_bn_\n"
        << "               (Prometheus: rate(normd_bn_mean_shift_sum{mode=\"eval\"}[5m]) / "
           "rate(normd_bn_mean_shift_count{mode=\"eval\"}[5m]))\n";
  }
  out << "  the model    " << ctl << " get " << id << '\n';
  if (!args.out_dir.empty()) {
    out << "  activations  " << ctl << " inspect " << id << " --data " << args.out_dir
        << "/shifted.csv --label-column label\n"
        << "  evaluate     " << ctl << " eval " << id << " --data " << args.out_dir
        << "/shifted.csv\n";
  }
  out << "  adapt        " << ctl << " adapt " << id << " --data recent.csv"
      << "  (unlabelled recent inputs; all or nothing)\n"
      << "  everything   normctl --help\n";
  return kExitOk;
}

}  // namespace normctl
