// Plain configuration structs describing a model: what the wire's ModelSpec becomes once the
// server has decoded it (server/convert.cc is the only place that converts), and what tests and
// benchmarks build models from directly. Defaults are PyTorch's.
#ifndef NORMD_CORE_CONFIG_H_
#define NORMD_CORE_CONFIG_H_

#include <cstdint>
#include <string>
#include <vector>

namespace normd {

struct LinearConfig {
  int64_t in_features = 0;
  int64_t out_features = 0;
  bool bias = true;
};

struct BatchNormConfig {
  int64_t num_features = 0;
  float eps = 1e-5f;
  float momentum = 0.1f;
  bool cumulative_average = false;  // PyTorch momentum=None: m = 1/num_batches_tracked
  bool affine = true;
  bool track_running_stats = true;
};

struct LayerNormConfig {
  std::vector<int64_t> normalized_shape;
  float eps = 1e-5f;
  bool elementwise_affine = true;
};

struct GroupNormConfig {
  int64_t num_groups = 0;
  int64_t num_channels = 0;
  float eps = 1e-5f;
  bool affine = true;
};

struct InstanceNormConfig {
  int64_t num_features = 0;
  float eps = 1e-5f;
  float momentum = 0.1f;
  bool affine = false;               // PyTorch's default for InstanceNorm
  bool track_running_stats = false;  // PyTorch's default for InstanceNorm
};

struct Conv2dConfig {
  int64_t in_channels = 0;
  int64_t out_channels = 0;
  int64_t kernel_size = 0;
  int64_t stride = 1;
  int64_t padding = 0;
  bool bias = true;
  // Grouped convolution: channels split into `groups` independent convolutions (groups =
  // in_channels: depthwise). Both channel counts must be divisible by it.
  int64_t groups = 1;
};

struct Pool2dConfig {
  int64_t kernel_size = 0;
  int64_t stride = 0;  // 0: same as kernel_size (PyTorch's stride=None)
  int64_t padding = 0;
};

enum class LayerKind {
  kLinear,
  kBatchNorm1d,
  kBatchNorm2d,
  kLayerNorm,
  kConv2d,
  kMaxPool2d,
  kAvgPool2d,
  kFlatten,
  kReLU,
  kLeakyReLU,
  kTanh,
  kSigmoid,
  kGELU,
  kDropout,
  kGroupNorm,
  kInstanceNorm1d,
  kInstanceNorm2d,
  kResidual,           // body(x) + shortcut(x): ResidualConfig
  kAdaptiveAvgPool2d,  // AdaptiveAvgPool2d((1, 1)): (N, C, H, W) -> (N, C, 1, 1)
};

// How deep residual blocks may nest (a block inside a block's body is depth 2).
constexpr int kMaxResidualDepth = 16;

// PyTorch's class name for a kind ("BatchNorm1d").
const char* LayerKindName(LayerKind kind);
// BatchNorm, LayerNorm, GroupNorm and InstanceNorm: the layers whose parameters recipes exempt
// from weight decay (OptimizerConfig::no_weight_decay_on_norm_and_bias).
bool IsNormLayerKind(LayerKind kind);

struct LayerConfig;

// A residual block: output = body(x) + shortcut(x), each branch a stack of layers applied in
// order, as nn.Sequential; an empty shortcut is the identity. The body must not be empty.
struct ResidualConfig {
  std::vector<LayerConfig> body;
  std::vector<LayerConfig> shortcut;
};

// One layer. Only the member matching `kind` is read.
struct LayerConfig {
  LayerKind kind = LayerKind::kReLU;
  std::string name;  // the metrics label; empty: the layer's index
  LinearConfig linear;
  BatchNormConfig batch_norm;  // kBatchNorm1d, kBatchNorm2d
  LayerNormConfig layer_norm;
  GroupNormConfig group_norm;
  InstanceNormConfig instance_norm;  // kInstanceNorm1d, kInstanceNorm2d
  Conv2dConfig conv2d;
  Pool2dConfig pool;  // kMaxPool2d, kAvgPool2d
  ResidualConfig residual;
  float negative_slope = 0.01f;  // kLeakyReLU
  float dropout_p = 0.5f;        // kDropout
};

enum class LossKind { kCrossEntropy, kMse, kBceWithLogits };

struct SgdConfig {
  float lr = 0.01f;
  float momentum = 0.0f;
  float dampening = 0.0f;
  bool nesterov = false;
  float weight_decay = 0.0f;
};

struct AdamConfig {
  float lr = 1e-3f;
  float beta1 = 0.9f;
  float beta2 = 0.999f;
  float eps = 1e-8f;
  float weight_decay = 0.0f;
  bool decoupled_weight_decay = false;  // true: AdamW
};

enum class OptimizerKind { kSgd, kAdam };

// A learning-rate schedule applied per optimizer step (core/lr_schedule.h has the formulas and
// the PyTorch schedulers they equal). The default is no schedule: the optimizer's lr throughout.
struct LrScheduleConfig {
  // Linear warm-up over the first warmup_steps steps, from warmup_start_factor * lr to lr
  // (LinearLR with end_factor 1). 0: none.
  int64_t warmup_steps = 0;
  double warmup_start_factor = 1.0 / 3.0;  // LinearLR's default

  // What follows the warm-up (or runs from step 0 without one).
  enum class Decay { kNone, kStep, kCosine };
  Decay decay = Decay::kNone;
  int64_t step_size = 1;  // kStep: StepLR(step_size, gamma)
  double gamma = 0.1;
  int64_t t_max = 1;  // kCosine: CosineAnnealingLR(T_max, eta_min)
  double eta_min = 0.0;

  bool active() const { return warmup_steps > 0 || decay != Decay::kNone; }
  bool operator==(const LrScheduleConfig& o) const {
    return warmup_steps == o.warmup_steps && warmup_start_factor == o.warmup_start_factor &&
           decay == o.decay && step_size == o.step_size && gamma == o.gamma &&
           t_max == o.t_max && eta_min == o.eta_min;
  }
  bool operator!=(const LrScheduleConfig& o) const { return !(*this == o); }
};

struct OptimizerConfig {
  OptimizerKind kind = OptimizerKind::kSgd;
  SgdConfig sgd;
  AdamConfig adam;
  LrScheduleConfig schedule;
  // > 0: before every step, torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm) (norm
  // type 2). 0: no clipping.
  double max_grad_norm = 0.0;
  // The parameter groups of the usual recipes: no weight decay for the parameters of norm
  // layers (BatchNorm, LayerNorm, GroupNorm, InstanceNorm) nor for any bias.
  bool no_weight_decay_on_norm_and_bias = false;
};

struct ModelConfig {
  std::vector<int64_t> input_shape;  // one sample, e.g. {784} or {1, 28, 28}
  std::vector<LayerConfig> layers;
  LossKind loss = LossKind::kCrossEntropy;
  // Cross-entropy only: F.cross_entropy's label_smoothing, in [0, 1).
  double label_smoothing = 0.0;
  OptimizerConfig optimizer;
  uint64_t seed = 0;
};

}  // namespace normd

#endif  // NORMD_CORE_CONFIG_H_
