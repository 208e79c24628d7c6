// Datasets shaped for a model, and the training/evaluation loops shared by `train`, `eval` and
// `demo`.
#ifndef NORMD_CLIENT_NORMCTL_TRAIN_H_
#define NORMD_CLIENT_NORMCTL_TRAIN_H_

#include <cstdint>
#include <ostream>
#include <string>
#include <vector>

#include "client/normctl/progress.h"
#include "client/normd_client.h"

namespace normctl {

// Samples for one model: inputs of shape (n, *input_shape) and, for supervised use, either
// class labels (cross-entropy) or float targets of shape (n, *output_shape).
struct Dataset {
  std::vector<int64_t> sample_shape;  // the model's input_shape
  int64_t n = 0;
  std::vector<float> inputs;  // n * prod(sample_shape)
  bool classification = false;
  std::vector<int64_t> labels;        // classification: n labels
  std::vector<int64_t> target_shape;  // regression: the model's output_shape
  std::vector<float> targets;         // regression: n * prod(target_shape)

  int64_t sample_size() const;
  bool has_labels() const { return !labels.empty() || !targets.empty(); }
};

// Reads a CSV for `model`. label_column ("" for none) names the label/target column; the other
// columns are the features and must number prod(input_shape). Throws InputError on mismatch.
Dataset LoadDataset(const normd::v1::Model& model, const std::string& path,
                    const std::string& label_column);

// Builds a dataset from in-memory features/labels (column-less data for the demo).
Dataset MakeDataset(const normd::v1::Model& model, std::vector<float> inputs,
                    std::vector<float> label_values);

// Rows [begin, begin+count) in `order` gathered into contiguous batch buffers.
void GatherBatch(const Dataset& data, const std::vector<int64_t>& order, int64_t begin,
                 int64_t count, std::vector<float>* inputs, std::vector<int64_t>* labels,
                 std::vector<float>* targets);

struct TrainOptions {
  int epochs = 1;
  int64_t batch = 32;
  bool shuffle = false;
  uint64_t seed = 1;
  ProgressStyle progress = ProgressStyle::kAuto;
  int window = 8;  // batches in flight on the stream before waiting for a response
};

struct EpochSummary {
  double loss = 0;  // sample-weighted mean of the batch losses
  int64_t samples = 0;
  double seconds = 0;
  uint64_t step = 0;
  double last_lr = 0;         // the learning rate of the epoch's last step
  double mean_grad_norm = 0;  // mean over the epoch's steps, before clipping
};

struct EvalSummary {
  double loss = 0;
  double accuracy = 0;
  int64_t samples = 0;
};

// Trains over `train` for options.epochs epochs, one TrainStream per epoch, printing progress
// and a summary per epoch to `out` (with validation loss/accuracy when `val` is non-null).
std::vector<EpochSummary> Train(normd::client::Client& client, const std::string& model,
                                const Dataset& train, const Dataset* val,
                                const TrainOptions& options, std::ostream& out);

// Evaluate over the whole dataset in batches of `batch`, combined weighted by samples.
EvalSummary EvaluateDataset(normd::client::Client& client, const std::string& model,
                            const Dataset& data, int64_t batch);

// Forward over the whole dataset in batches; returns outputs (n, prod(output_shape)).
normd::client::Tensor PredictDataset(normd::client::Client& client, const std::string& model,
                                     const Dataset& data, int64_t batch);

// AdaptStatistics over the whole dataset, streamed in batches (a trailing single sample joins
// the batch before it); returns the adapted model.
normd::v1::Model AdaptDataset(normd::client::Client& client, const std::string& model,
                              const Dataset& data, int64_t batch);

}  // namespace normctl

#endif  // NORMD_CLIENT_NORMCTL_TRAIN_H_
