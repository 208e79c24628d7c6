#include "client/normctl/train.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <random>
#include <utility>

#include "client/normctl/csv.h"

namespace normctl {
namespace {

using normd::client::Client;

int64_t Product(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::string ShapeString(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

// Batch boundaries covering n samples. A trailing batch of one sample joins the previous batch:
// BatchNorm cannot train on a single value per channel.
std::vector<std::pair<int64_t, int64_t>> Batches(int64_t n, int64_t batch) {
  std::vector<std::pair<int64_t, int64_t>> out;
  for (int64_t begin = 0; begin < n; begin += batch) {
    out.emplace_back(begin, std::min(batch, n - begin));
  }
  if (out.size() >= 2 && out.back().second == 1) {
    out.pop_back();
    out.back().second += 1;
  }
  return out;
}

std::vector<int64_t> WithBatch(int64_t n, const std::vector<int64_t>& shape) {
  std::vector<int64_t> s{n};
  s.insert(s.end(), shape.begin(), shape.end());
  return s;
}

}  // namespace

int64_t Dataset::sample_size() const { return Product(sample_shape); }

Dataset MakeDataset(const normd::v1::Model& model, std::vector<float> inputs,
                    std::vector<float> label_values) {
  Dataset data;
  data.sample_shape.assign(model.spec().input_shape().begin(), model.spec().input_shape().end());
  const int64_t per_sample = data.sample_size();
  if (per_sample <= 0 || inputs.size() % per_sample != 0) {
    throw InputError("the data has " + std::to_string(inputs.size()) +
                     " values, not a multiple of the model's input_shape " +
                     ShapeString(data.sample_shape) + " (" + std::to_string(per_sample) +
                     " values per sample)");
  }
  data.n = static_cast<int64_t>(inputs.size()) / per_sample;
  data.inputs = std::move(inputs);
  data.classification = model.spec().loss() == normd::v1::LOSS_CROSS_ENTROPY;
  if (label_values.empty()) return data;
  if (data.classification) {
    data.labels.reserve(label_values.size());
    for (size_t i = 0; i < label_values.size(); ++i) {
      const float v = label_values[i];
      if (v < 0 || v != std::floor(v)) {
        throw InputError("label of sample " + std::to_string(i) + " is " + std::to_string(v) +
                         ": class labels must be non-negative integers");
      }
      data.labels.push_back(static_cast<int64_t>(v));
    }
  } else {
    data.target_shape.assign(model.output_shape().begin(), model.output_shape().end());
    if (data.target_shape.empty()) data.target_shape = {1};
    if (Product(data.target_shape) != 1) {
      throw InputError("the model's output_shape is " + ShapeString(data.target_shape) +
                       " but the data has one target column");
    }
    data.targets = std::move(label_values);
  }
  return data;
}

Dataset LoadDataset(const normd::v1::Model& model, const std::string& path,
                    const std::string& label_column) {
  CsvTable table = ReadCsv(path);
  const int64_t column = label_column.empty() ? -1 : ResolveColumn(table, label_column);
  std::vector<float> features, labels;
  SplitColumn(table, column, &features, &labels);
  const int64_t feature_cols = column < 0 ? table.cols : table.cols - 1;
  int64_t per_sample = 1;
  for (int64_t d : model.spec().input_shape()) per_sample *= d;
  if (feature_cols != per_sample) {
    std::vector<int64_t> shape(model.spec().input_shape().begin(),
                               model.spec().input_shape().end());
    throw InputError("'" + path + "' has " + std::to_string(feature_cols) + " feature columns" +
                     (column >= 0 ? " (besides the label column)" : "") + " but model '" +
                     model.id() + "' takes input_shape " + ShapeString(shape) + " (" +
                     std::to_string(per_sample) + " values)");
  }
  return MakeDataset(model, std::move(features), std::move(labels));
}

void GatherBatch(const Dataset& data, const std::vector<int64_t>& order, int64_t begin,
                 int64_t count, std::vector<float>* inputs, std::vector<int64_t>* labels,
                 std::vector<float>* targets) {
  const int64_t per_sample = data.sample_size();
  const int64_t per_target = Product(data.target_shape);
  inputs->resize(count * per_sample);
  labels->clear();
  targets->clear();
  for (int64_t i = 0; i < count; ++i) {
    const int64_t row = order.empty() ? begin + i : order[begin + i];
    std::copy_n(data.inputs.data() + row * per_sample, per_sample, inputs->data() + i * per_sample);
    if (!data.labels.empty()) labels->push_back(data.labels[row]);
    if (!data.targets.empty()) {
      targets->insert(targets->end(), data.targets.begin() + row * per_target,
                      data.targets.begin() + (row + 1) * per_target);
    }
  }
}

std::vector<EpochSummary> Train(Client& client, const std::string& model, const Dataset& train,
                                const Dataset* val, const TrainOptions& options,
                                std::ostream& out) {
  if (!train.has_labels()) throw InputError("training data needs a label column");
  if (options.batch <= 0) throw InputError("--batch must be positive");
  std::vector<int64_t> order(train.n);
  std::iota(order.begin(), order.end(), 0);
  std::mt19937_64 rng(options.seed);
  const auto batches = Batches(train.n, options.batch);
  std::vector<float> inputs, targets;
  std::vector<int64_t> labels;
  std::vector<EpochSummary> summaries;

  for (int epoch = 1; epoch <= options.epochs; ++epoch) {
    if (options.shuffle) std::shuffle(order.begin(), order.end(), rng);
    EpochProgress progress(out, options.progress, epoch, options.epochs, train.n);
    EpochSummary summary;
    double loss_sum = 0, grad_norm_sum = 0;
    int64_t steps = 0;
    auto take = [&](const normd::v1::TrainStepResponse& r) {
      loss_sum += r.loss() * static_cast<double>(r.samples());
      summary.samples += r.samples();
      summary.step = r.step();
      summary.last_lr = r.learning_rate();
      grad_norm_sum += r.grad_norm();
      ++steps;
      progress.Update(summary.samples, loss_sum / std::max<int64_t>(summary.samples, 1));
    };
    auto stream = client.OpenTrainStream(model);
    for (const auto& [begin, count] : batches) {
      GatherBatch(train, order, begin, count, &inputs, &labels, &targets);
      normd::client::TensorView x(inputs.data(), WithBatch(count, train.sample_shape));
      if (train.classification) {
        stream->Write(x, labels);
      } else {
        stream->WriteWithTarget(
            x, normd::client::TensorView(targets.data(), WithBatch(count, train.target_shape)));
      }
      while (stream->pending() >= options.window) take(stream->Read());
    }
    for (const auto& r : stream->Finish()) take(r);
    progress.Done();
    summary.loss = loss_sum / std::max<int64_t>(summary.samples, 1);
    summary.mean_grad_norm = grad_norm_sum / static_cast<double>(std::max<int64_t>(steps, 1));
    summary.seconds = progress.elapsed_seconds();

    char line[320];
    std::snprintf(line, sizeof line,
                  "epoch %d/%d  loss %.4f  %lld samples in %.2f s (%.0f samples/s)  step %llu"
                  "  lr %.4g  grad norm %.4g",
                  epoch, options.epochs, summary.loss, static_cast<long long>(summary.samples),
                  summary.seconds, summary.samples / std::max(summary.seconds, 1e-9),
                  static_cast<unsigned long long>(summary.step), summary.last_lr,
                  summary.mean_grad_norm);
    out << line;
    if (val != nullptr) {
      const EvalSummary v = EvaluateDataset(client, model, *val, 4096);
      std::snprintf(line, sizeof line, "  val loss %.4f", v.loss);
      out << line;
      if (val->classification) {
        std::snprintf(line, sizeof line, "  val accuracy %.2f%%", 100 * v.accuracy);
        out << line;
      }
    }
    out << std::endl;
    summaries.push_back(summary);
  }
  return summaries;
}

EvalSummary EvaluateDataset(Client& client, const std::string& model, const Dataset& data,
                            int64_t batch) {
  if (!data.has_labels()) throw InputError("evaluation data needs a label column");
  EvalSummary total;
  double loss_sum = 0, correct = 0;
  std::vector<float> inputs, targets;
  std::vector<int64_t> labels;
  for (int64_t begin = 0; begin < data.n; begin += batch) {
    const int64_t count = std::min(batch, data.n - begin);
    GatherBatch(data, {}, begin, count, &inputs, &labels, &targets);
    normd::client::TensorView x(inputs.data(), WithBatch(count, data.sample_shape));
    const normd::v1::EvaluateResponse r =
        data.classification
            ? client.Evaluate(model, x, labels)
            : client.EvaluateWithTarget(
                  model, x,
                  normd::client::TensorView(targets.data(), WithBatch(count, data.target_shape)));
    loss_sum += r.loss() * r.samples();
    correct += r.accuracy() * r.samples();
    total.samples += r.samples();
  }
  if (total.samples > 0) {
    total.loss = loss_sum / total.samples;
    total.accuracy = correct / total.samples;
  }
  return total;
}

normd::client::Tensor PredictDataset(Client& client, const std::string& model, const Dataset& data,
                                     int64_t batch) {
  if (batch <= 0) throw InputError("--batch must be positive");
  normd::client::Tensor all;
  for (const auto& [begin, count] : Batches(data.n, batch)) {
    normd::client::TensorView x(data.inputs.data() + begin * data.sample_size(),
                                WithBatch(count, data.sample_shape));
    normd::client::Tensor out = client.Forward(model, x).output;
    if (all.shape.empty()) {
      all.shape = out.shape;
      all.shape[0] = 0;
    }
    all.shape[0] += out.rows();
    all.values.insert(all.values.end(), out.values.begin(), out.values.end());
  }
  return all;
}

normd::v1::Model AdaptDataset(Client& client, const std::string& model, const Dataset& data,
                              int64_t batch) {
  if (batch <= 0) throw InputError("--batch must be positive");
  std::vector<normd::client::TensorView> batches;
  for (const auto& [begin, count] : Batches(data.n, batch)) {
    batches.emplace_back(data.inputs.data() + begin * data.sample_size(),
                         WithBatch(count, data.sample_shape));
  }
  return client.AdaptStatistics(model, batches);
}

}  // namespace normctl
