// The one place that converts between wire messages (normd.v1) and core types.
//
// Decoding validates what the wire allows but the core cannot express (a negative dimension,
// both encodings set, a byte count that is not a whole number of floats) and answers
// INVALID_ARGUMENT with a message naming the field, e.g.
//   "spec.layers[2].batch_norm1d.eps must be > 0, got 0".
// Size limits answer RESOURCE_EXHAUSTED. Checks that need the model (shapes against the
// architecture, label ranges, finiteness of inputs and targets) are left to the core, which
// makes them anyway, so no request pays for a check twice.
//
// Tensors are decoded without copying whenever the message's storage can serve as the core's
// row-major float buffer: `values` always (a packed repeated float is a float array), `raw` when
// its bytes are 4-byte aligned on a little-endian host; otherwise `raw` is copied once.
#ifndef NORMD_SERVER_CONVERT_H_
#define NORMD_SERVER_CONVERT_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "core/config.h"
#include "core/fold.h"
#include "core/loss.h"
#include "core/model.h"
#include "core/sequential.h"
#include "core/status.h"
#include "core/tensor.h"
#include "normd/v1/normd.pb.h"

namespace normd::server {

// --- Model specs -------------------------------------------------------------------------------

// Validates every field of `spec` and fills `config`. Architecture checks (does layer i accept
// layer i-1's output) and size limits are the core's (Model::Create).
Status SpecToConfig(const v1::ModelSpec& spec, ModelConfig* config);

// The optimizer part alone (UpdateOptimizer). `field` prefixes messages ("optimizer").
Status OptimizerSpecToConfig(const v1::OptimizerSpec& spec, const std::string& field,
                             OptimizerConfig* config);

// --- Tensors -----------------------------------------------------------------------------------

// A tensor decoded from a request. `view` points into the request message (which must outlive
// it) or into `copy_`. Not copyable or movable: the view may point into the object itself.
class DecodedTensor {
 public:
  DecodedTensor() = default;
  DecodedTensor(const DecodedTensor&) = delete;
  DecodedTensor& operator=(const DecodedTensor&) = delete;

  const ConstTensorView& view() const { return view_; }
  // True when the request used the `raw` encoding (responses answer in the same encoding).
  bool raw() const { return raw_; }
  // True when decoding had to copy (misaligned raw bytes or a big-endian host).
  bool copied() const { return !copy_.empty(); }

 private:
  friend Status DecodeTensor(const v1::Tensor&, std::string_view, int64_t, DecodedTensor*);
  ConstTensorView view_;
  bool raw_ = false;
  std::vector<float> copy_;
};

// Decodes `wire` (named `field` in messages). Checks: at most one encoding set, raw length a
// multiple of 4, rank <= kMaxRank, dimensions >= 0, element count equal to the shape's product,
// and at most `max_elements` elements (RESOURCE_EXHAUSTED).
Status DecodeTensor(const v1::Tensor& wire, std::string_view field, int64_t max_elements,
                    DecodedTensor* out);

// Writes a row-major tensor in the raw (little-endian float32 bytes) or values encoding.
void EncodeTensor(const float* data, const Shape& shape, bool raw, v1::Tensor* out);

// The loss targets of a TrainStep or Evaluate request: labels point into the request's
// repeated field; `target` is decoded only when the request sets it.
struct DecodedTargets {
  Targets targets;
  DecodedTensor target;
};

// Decodes labels and target of a TrainStep/Evaluate request. Which of the two the loss needs
// (and whether they match the output) is checked by the core's ValidateTargets; setting both is
// INVALID_ARGUMENT here.
Status DecodeTargets(const google::protobuf::RepeatedField<int64_t>& labels,
                     const v1::Tensor* target, int64_t max_elements, DecodedTargets* out);

// --- State -------------------------------------------------------------------------------------

// ModelState -> core entries (copies: SetState is rare). Validates encodings and shapes of
// each entry ("state.tensors[3] (1.running_var): ..."); names and shapes against the model
// are the core's (Model::SetState).
Status StateFromWire(const v1::ModelState& wire, int64_t max_elements,
                     std::vector<NamedTensor>* out);

// Core entries -> ModelState, in the values encoding (human-readable through grpcurl's JSON and
// exactly as compact as raw on the wire: a packed float is 4 bytes). Counters are 0-d tensors.
void StateToWire(const std::vector<NamedTensor>& state, v1::ModelState* out);

// --- Models ------------------------------------------------------------------------------------

// What a Model message reports, captured under the model's lock (see Registry).
struct ModelSummary {
  bool training = true;
  bool running_stats_frozen = false;
  uint64_t step = 0;
  int64_t parameter_count = 0;
  std::vector<int64_t> output_shape;  // per sample
  std::vector<BatchNormStatus> batch_norms;
  std::vector<LayerOptionsStatus> layer_options;
  bool inference_only = false;
  double learning_rate = 0.0;  // of the next optimizer step
};

// Reads a summary from the model. REQUIRES: the caller holds the model's lock (shared is
// enough).
ModelSummary SummarizeModel(const Model& model);

void ModelToWire(const std::string& id, const v1::ModelSpec& spec, const ModelSummary& summary,
                 v1::Model* out);

// SetLayerOptions' request -> core changes (an unset field stays unset).
void LayerOptionsFromWire(const google::protobuf::RepeatedPtrField<v1::LayerOptions>& wire,
                          std::vector<LayerOptionsChange>* out);

// The spec of a FoldBatchNorm copy: `source`'s spec (the one `folded` was computed from) with
// the folded BatchNorm layers left out and their Linear/Conv2d given a bias, in residual
// blocks' branches too.
void FoldedSpecToWire(const v1::ModelSpec& source, const FoldedModel& folded, v1::ModelSpec* out);

// Layer statistics of a forward, one entry per node of the layer tree (Sequential::nodes():
// index is the node index, name its label; a residual block, then its layers).
void LayerStatsToWire(const Sequential& net, const std::vector<LayerActivationStats>& stats,
                      google::protobuf::RepeatedPtrField<v1::LayerStats>* out);

}  // namespace normd::server

#endif  // NORMD_SERVER_CONVERT_H_
