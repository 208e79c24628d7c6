#include "server/convert.h"

#include <cmath>
#include <cstring>
#include <limits>

#include "core/lr_schedule.h"

namespace normd::server {
namespace {

// Every size in a spec fits comfortably in 32 bits; larger values are typos or attacks, and
// refusing them here keeps the core's arithmetic far from overflow.
constexpr int64_t kMaxSpecValue = std::numeric_limits<int32_t>::max();
constexpr size_t kMaxLayerNameLength = 64;

constexpr bool kHostLittleEndian = __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__;

// Checks an integer size field: lo <= v <= kMaxSpecValue.
Status CheckSize(int64_t v, int64_t lo, const std::string& field) {
  if (v < lo) {
    return InvalidArgument(field, " must be ", lo == 0 ? ">= 0" : StrCat(">= ", lo), ", got ", v);
  }
  if (v > kMaxSpecValue) {
    return InvalidArgument(field, " must be at most ", kMaxSpecValue, ", got ", v);
  }
  return Status::Ok();
}

Status CheckPositiveFloat(float v, const std::string& field) {
  if (!std::isfinite(v) || v <= 0.0f) return InvalidArgument(field, " must be > 0, got ", v);
  return Status::Ok();
}

Status CheckNonNegativeFloat(float v, const std::string& field) {
  if (!std::isfinite(v) || v < 0.0f) return InvalidArgument(field, " must be >= 0, got ", v);
  return Status::Ok();
}

// lo <= v < hi (hi_inclusive: lo <= v <= hi).
Status CheckRange(float v, float lo, float hi, bool hi_inclusive, const std::string& field) {
  const bool ok = std::isfinite(v) && v >= lo && (hi_inclusive ? v <= hi : v < hi);
  if (!ok) {
    return InvalidArgument(field, " must be in [", lo, ", ", hi, hi_inclusive ? "]" : ")",
                           ", got ", v);
  }
  return Status::Ok();
}

bool IsNameChar(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
         c == '.' || c == '_' || c == '-';
}

Status CheckLayerName(const std::string& name, const std::string& field) {
  if (name.size() > kMaxLayerNameLength) {
    return InvalidArgument(field, " must be at most ", kMaxLayerNameLength,
                           " characters, got ", name.size());
  }
  for (char c : name) {
    if (!IsNameChar(c)) {
      return InvalidArgument(field, " may contain only letters, digits, '.', '_' and '-', got '",
                             name, "'");
    }
  }
  return Status::Ok();
}

Status BatchNormFromWire(const v1::BatchNormSpec& w, const std::string& f, BatchNormConfig* c) {
  NORMD_RETURN_IF_ERROR(CheckSize(w.num_features(), 1, f + ".num_features"));
  c->num_features = w.num_features();
  if (w.has_eps()) {
    NORMD_RETURN_IF_ERROR(CheckPositiveFloat(w.eps(), f + ".eps"));
    c->eps = w.eps();
  }
  if (w.cumulative_average() && w.has_momentum()) {
    return InvalidArgument(f, ".momentum must not be set with ", f,
                           ".cumulative_average (PyTorch's momentum=None)");
  }
  if (w.has_momentum()) {
    NORMD_RETURN_IF_ERROR(CheckRange(w.momentum(), 0.0f, 1.0f, true, f + ".momentum"));
    c->momentum = w.momentum();
  }
  c->cumulative_average = w.cumulative_average();
  if (w.has_affine()) c->affine = w.affine();
  if (w.has_track_running_stats()) c->track_running_stats = w.track_running_stats();
  return Status::Ok();
}

Status InstanceNormFromWire(const v1::InstanceNormSpec& w, const std::string& f,
                            InstanceNormConfig* c) {
  NORMD_RETURN_IF_ERROR(CheckSize(w.num_features(), 1, f + ".num_features"));
  c->num_features = w.num_features();
  if (w.has_eps()) {
    NORMD_RETURN_IF_ERROR(CheckPositiveFloat(w.eps(), f + ".eps"));
    c->eps = w.eps();
  }
  if (w.has_momentum()) {
    NORMD_RETURN_IF_ERROR(CheckRange(w.momentum(), 0.0f, 1.0f, true, f + ".momentum"));
    c->momentum = w.momentum();
  }
  if (w.has_affine()) c->affine = w.affine();
  if (w.has_track_running_stats()) c->track_running_stats = w.track_running_stats();
  return Status::Ok();
}

Status PoolFromWire(const v1::Pool2dSpec& w, const std::string& f, Pool2dConfig* c) {
  NORMD_RETURN_IF_ERROR(CheckSize(w.kernel_size(), 1, f + ".kernel_size"));
  c->kernel_size = w.kernel_size();
  if (w.has_stride()) {
    NORMD_RETURN_IF_ERROR(CheckSize(w.stride(), 1, f + ".stride"));
    c->stride = w.stride();
  } else {
    c->stride = 0;  // PyTorch's stride=None: the kernel size
  }
  NORMD_RETURN_IF_ERROR(CheckSize(w.padding(), 0, f + ".padding"));
  c->padding = w.padding();
  return Status::Ok();
}

Status LayerFromWire(const v1::LayerSpec& w, const std::string& f, int depth, LayerConfig* c);

// A residual block's branches; depth: how many blocks hold this one (0 at the top level).
Status ResidualFromWire(const v1::ResidualSpec& w, const std::string& f, int depth,
                        ResidualConfig* c) {
  if (depth >= kMaxResidualDepth) {
    return InvalidArgument(f, ": residual blocks nest more than ", kMaxResidualDepth, " deep");
  }
  if (w.body_size() == 0) {
    return InvalidArgument(f, ".body is empty: a residual block needs at least one layer in it");
  }
  c->body.resize(w.body_size());
  for (int i = 0; i < w.body_size(); ++i) {
    NORMD_RETURN_IF_ERROR(
        LayerFromWire(w.body(i), StrCat(f, ".body[", i, "]"), depth + 1, &c->body[i]));
  }
  c->shortcut.resize(w.shortcut_size());
  for (int i = 0; i < w.shortcut_size(); ++i) {
    NORMD_RETURN_IF_ERROR(LayerFromWire(w.shortcut(i), StrCat(f, ".shortcut[", i, "]"),
                                        depth + 1, &c->shortcut[i]));
  }
  return Status::Ok();
}

Status LayerFromWire(const v1::LayerSpec& w, const std::string& f, int depth, LayerConfig* c) {
  NORMD_RETURN_IF_ERROR(CheckLayerName(w.name(), f + ".name"));
  c->name = w.name();
  switch (w.kind_case()) {
    case v1::LayerSpec::kLinear: {
      c->kind = LayerKind::kLinear;
      NORMD_RETURN_IF_ERROR(CheckSize(w.linear().in_features(), 1, f + ".linear.in_features"));
      NORMD_RETURN_IF_ERROR(
          CheckSize(w.linear().out_features(), 1, f + ".linear.out_features"));
      c->linear.in_features = w.linear().in_features();
      c->linear.out_features = w.linear().out_features();
      if (w.linear().has_bias()) c->linear.bias = w.linear().bias();
      return Status::Ok();
    }
    case v1::LayerSpec::kBatchNorm1D:
      c->kind = LayerKind::kBatchNorm1d;
      return BatchNormFromWire(w.batch_norm1d(), f + ".batch_norm1d", &c->batch_norm);
    case v1::LayerSpec::kBatchNorm2D:
      c->kind = LayerKind::kBatchNorm2d;
      return BatchNormFromWire(w.batch_norm2d(), f + ".batch_norm2d", &c->batch_norm);
    case v1::LayerSpec::kLayerNorm: {
      c->kind = LayerKind::kLayerNorm;
      const v1::LayerNormSpec& ln = w.layer_norm();
      const std::string g = f + ".layer_norm";
      if (ln.normalized_shape_size() == 0) {
        return InvalidArgument(g, ".normalized_shape must have at least one dimension");
      }
      if (ln.normalized_shape_size() >= kMaxRank) {
        return InvalidArgument(g, ".normalized_shape has ", ln.normalized_shape_size(),
                               " dimensions, at most ", kMaxRank - 1, " are supported");
      }
      for (int i = 0; i < ln.normalized_shape_size(); ++i) {
        NORMD_RETURN_IF_ERROR(
            CheckSize(ln.normalized_shape(i), 1, StrCat(g, ".normalized_shape[", i, "]")));
        c->layer_norm.normalized_shape.push_back(ln.normalized_shape(i));
      }
      if (ln.has_eps()) {
        NORMD_RETURN_IF_ERROR(CheckPositiveFloat(ln.eps(), g + ".eps"));
        c->layer_norm.eps = ln.eps();
      }
      if (ln.has_elementwise_affine()) c->layer_norm.elementwise_affine = ln.elementwise_affine();
      return Status::Ok();
    }
    case v1::LayerSpec::kConv2D: {
      c->kind = LayerKind::kConv2d;
      const v1::Conv2dSpec& cv = w.conv2d();
      const std::string g = f + ".conv2d";
      NORMD_RETURN_IF_ERROR(CheckSize(cv.in_channels(), 1, g + ".in_channels"));
      NORMD_RETURN_IF_ERROR(CheckSize(cv.out_channels(), 1, g + ".out_channels"));
      NORMD_RETURN_IF_ERROR(CheckSize(cv.kernel_size(), 1, g + ".kernel_size"));
      c->conv2d.in_channels = cv.in_channels();
      c->conv2d.out_channels = cv.out_channels();
      c->conv2d.kernel_size = cv.kernel_size();
      if (cv.has_stride()) {
        NORMD_RETURN_IF_ERROR(CheckSize(cv.stride(), 1, g + ".stride"));
        c->conv2d.stride = cv.stride();
      }
      NORMD_RETURN_IF_ERROR(CheckSize(cv.padding(), 0, g + ".padding"));
      c->conv2d.padding = cv.padding();
      if (cv.has_bias()) c->conv2d.bias = cv.bias();
      if (cv.has_groups()) {
        NORMD_RETURN_IF_ERROR(CheckSize(cv.groups(), 1, g + ".groups"));
        if (cv.in_channels() % cv.groups() != 0 || cv.out_channels() % cv.groups() != 0) {
          return InvalidArgument(g, ".in_channels (", cv.in_channels(), ") and ", g,
                                 ".out_channels (", cv.out_channels(),
                                 ") must both be divisible by ", g, ".groups (", cv.groups(),
                                 ")");
        }
        c->conv2d.groups = cv.groups();
      }
      return Status::Ok();
    }
    case v1::LayerSpec::kMaxPool2D:
      c->kind = LayerKind::kMaxPool2d;
      return PoolFromWire(w.max_pool2d(), f + ".max_pool2d", &c->pool);
    case v1::LayerSpec::kAvgPool2D:
      c->kind = LayerKind::kAvgPool2d;
      return PoolFromWire(w.avg_pool2d(), f + ".avg_pool2d", &c->pool);
    case v1::LayerSpec::kFlatten: c->kind = LayerKind::kFlatten; return Status::Ok();
    case v1::LayerSpec::kRelu: c->kind = LayerKind::kReLU; return Status::Ok();
    case v1::LayerSpec::kLeakyRelu:
      c->kind = LayerKind::kLeakyReLU;
      if (w.leaky_relu().has_negative_slope()) {
        if (!std::isfinite(w.leaky_relu().negative_slope())) {
          return InvalidArgument(f, ".leaky_relu.negative_slope must be finite, got ",
                                 w.leaky_relu().negative_slope());
        }
        c->negative_slope = w.leaky_relu().negative_slope();
      }
      return Status::Ok();
    case v1::LayerSpec::kTanh: c->kind = LayerKind::kTanh; return Status::Ok();
    case v1::LayerSpec::kSigmoid: c->kind = LayerKind::kSigmoid; return Status::Ok();
    case v1::LayerSpec::kGelu: c->kind = LayerKind::kGELU; return Status::Ok();
    case v1::LayerSpec::kDropout:
      c->kind = LayerKind::kDropout;
      NORMD_RETURN_IF_ERROR(CheckRange(w.dropout().p(), 0.0f, 1.0f, false, f + ".dropout.p"));
      c->dropout_p = w.dropout().p();
      return Status::Ok();
    case v1::LayerSpec::kGroupNorm: {
      c->kind = LayerKind::kGroupNorm;
      const v1::GroupNormSpec& gn = w.group_norm();
      const std::string g = f + ".group_norm";
      NORMD_RETURN_IF_ERROR(CheckSize(gn.num_groups(), 1, g + ".num_groups"));
      NORMD_RETURN_IF_ERROR(CheckSize(gn.num_channels(), 1, g + ".num_channels"));
      if (gn.num_channels() % gn.num_groups() != 0) {
        return InvalidArgument(g, ".num_channels (", gn.num_channels(),
                               ") must be divisible by ", g, ".num_groups (", gn.num_groups(), ")");
      }
      c->group_norm.num_groups = gn.num_groups();
      c->group_norm.num_channels = gn.num_channels();
      if (gn.has_eps()) {
        NORMD_RETURN_IF_ERROR(CheckPositiveFloat(gn.eps(), g + ".eps"));
        c->group_norm.eps = gn.eps();
      }
      if (gn.has_affine()) c->group_norm.affine = gn.affine();
      return Status::Ok();
    }
    case v1::LayerSpec::kInstanceNorm1D:
      c->kind = LayerKind::kInstanceNorm1d;
      return InstanceNormFromWire(w.instance_norm1d(), f + ".instance_norm1d", &c->instance_norm);
    case v1::LayerSpec::kInstanceNorm2D:
      c->kind = LayerKind::kInstanceNorm2d;
      return InstanceNormFromWire(w.instance_norm2d(), f + ".instance_norm2d", &c->instance_norm);
    case v1::LayerSpec::kResidual:
      c->kind = LayerKind::kResidual;
      return ResidualFromWire(w.residual(), f + ".residual", depth, &c->residual);
    case v1::LayerSpec::kAdaptiveAvgPool2D:
      c->kind = LayerKind::kAdaptiveAvgPool2d;
      return Status::Ok();
    case v1::LayerSpec::KIND_NOT_SET:
      break;
  }
  return InvalidArgument(f, " has no layer kind set (linear, batch_norm1d, batch_norm2d, "
                            "layer_norm, group_norm, instance_norm1d, instance_norm2d, conv2d, "
                            "max_pool2d, avg_pool2d, adaptive_avg_pool2d, flatten, relu, "
                            "leaky_relu, tanh, sigmoid, gelu, dropout or residual)");
}

// Counts of the supplied values; `values` and `raw` are exclusive.
Status CheckEncoding(const v1::Tensor& w, std::string_view field, int64_t* count) {
  if (w.values_size() > 0 && !w.raw().empty()) {
    return InvalidArgument(field, " sets both values and raw; use exactly one encoding");
  }
  if (w.raw().size() % sizeof(float) != 0) {
    return InvalidArgument(field, ".raw has ", w.raw().size(),
                           " bytes, not a multiple of 4 (little-endian float32)");
  }
  *count = w.raw().empty() ? w.values_size() : static_cast<int64_t>(w.raw().size() / 4);
  return Status::Ok();
}

Status ShapeFromWire(const v1::Tensor& w, std::string_view field, Shape* shape) {
  if (w.shape_size() > kMaxRank) {
    return InvalidArgument(field, ".shape has ", w.shape_size(), " dimensions, at most ",
                           kMaxRank, " are supported");
  }
  *shape = Shape();
  for (int i = 0; i < w.shape_size(); ++i) {
    if (w.shape(i) < 0) {
      return InvalidArgument(field, ".shape[", i, "] must be >= 0, got ", w.shape(i));
    }
    shape->push_back(w.shape(i));
  }
  // A shape whose element count does not fit in int64 is malformed, whatever the limits (a
  // zero dimension makes any shape empty, so only shapes without one can overflow).
  int64_t elements = 1;
  bool overflow = false;
  for (int64_t d : *shape) {
    if (d == 0) return Status::Ok();
    overflow = overflow || __builtin_mul_overflow(elements, d, &elements);
  }
  if (overflow) {
    return InvalidArgument(field, " has shape ", shape->ToString(),
                           ", whose element count overflows a 64-bit integer");
  }
  return Status::Ok();
}

Status LrScheduleFromWire(const v1::LrScheduleSpec& w, const std::string& f,
                          LrScheduleConfig* c) {
  *c = LrScheduleConfig();
  if (w.has_warmup()) {
    const std::string g = f + ".warmup";
    NORMD_RETURN_IF_ERROR(CheckSize(w.warmup().steps(), 1, g + ".steps"));
    c->warmup_steps = w.warmup().steps();
    if (w.warmup().has_start_factor()) {
      const double sf = w.warmup().start_factor();
      if (!(std::isfinite(sf) && sf > 0.0 && sf <= 1.0)) {
        return InvalidArgument(g, ".start_factor must be in (0, 1], got ", sf);
      }
      c->warmup_start_factor = sf;
    }
  }
  switch (w.decay_case()) {
    case v1::LrScheduleSpec::kStep: {
      const std::string g = f + ".step";
      c->decay = LrScheduleConfig::Decay::kStep;
      NORMD_RETURN_IF_ERROR(CheckSize(w.step().step_size(), 1, g + ".step_size"));
      c->step_size = w.step().step_size();
      if (w.step().has_gamma()) {
        const double gamma = w.step().gamma();
        if (!(std::isfinite(gamma) && gamma >= 0.0)) {
          return InvalidArgument(g, ".gamma must be >= 0, got ", gamma);
        }
        c->gamma = gamma;
      }
      break;
    }
    case v1::LrScheduleSpec::kCosine: {
      const std::string g = f + ".cosine";
      c->decay = LrScheduleConfig::Decay::kCosine;
      NORMD_RETURN_IF_ERROR(CheckSize(w.cosine().t_max(), 1, g + ".t_max"));
      c->t_max = w.cosine().t_max();
      const double eta_min = w.cosine().eta_min();
      if (!(std::isfinite(eta_min) && eta_min >= 0.0)) {
        return InvalidArgument(g, ".eta_min must be >= 0, got ", eta_min);
      }
      c->eta_min = eta_min;
      break;
    }
    case v1::LrScheduleSpec::DECAY_NOT_SET:
      break;
  }
  // The core's own rules, which the checks above already imply: a mismatch is a bug here. Kept
  // so a rule added to the core is enforced at the wire even before this function learns it.
  Status s = ValidateLrSchedule(*c);
  if (!s.ok()) return s.WithPrefix(f);
  return Status::Ok();
}

}  // namespace

Status OptimizerSpecToConfig(const v1::OptimizerSpec& w, const std::string& f,
                             OptimizerConfig* c) {
  *c = OptimizerConfig();
  if (w.has_lr_schedule()) {
    NORMD_RETURN_IF_ERROR(LrScheduleFromWire(w.lr_schedule(), f + ".lr_schedule", &c->schedule));
  }
  if (w.has_clip_grad_norm()) {
    const double max_norm = w.clip_grad_norm().max_norm();
    if (!(std::isfinite(max_norm) && max_norm > 0.0)) {
      return InvalidArgument(f, ".clip_grad_norm.max_norm must be > 0, got ", max_norm,
                             max_norm == 0.0 ? " (an unset max_norm reads as 0; leave "
                                               "clip_grad_norm unset for no clipping)"
                                             : "");
    }
    c->max_grad_norm = max_norm;
  }
  c->no_weight_decay_on_norm_and_bias = w.no_weight_decay_on_norm_and_bias();
  switch (w.kind_case()) {
    case v1::OptimizerSpec::kSgd: {
      const v1::SGDSpec& s = w.sgd();
      const std::string g = f + ".sgd";
      c->kind = OptimizerKind::kSgd;
      if (!std::isfinite(s.lr()) || s.lr() <= 0.0f) {
        return InvalidArgument(g, ".lr must be > 0, got ", s.lr(),
                               s.lr() == 0.0f ? " (an unset lr reads as 0)" : "");
      }
      NORMD_RETURN_IF_ERROR(CheckNonNegativeFloat(s.momentum(), g + ".momentum"));
      NORMD_RETURN_IF_ERROR(CheckNonNegativeFloat(s.dampening(), g + ".dampening"));
      NORMD_RETURN_IF_ERROR(CheckNonNegativeFloat(s.weight_decay(), g + ".weight_decay"));
      if (s.nesterov() && (s.momentum() <= 0.0f || s.dampening() != 0.0f)) {
        return InvalidArgument(g, ".nesterov requires momentum > 0 and dampening = 0, got "
                               "momentum ", s.momentum(), " and dampening ", s.dampening());
      }
      c->sgd.lr = s.lr();
      c->sgd.momentum = s.momentum();
      c->sgd.dampening = s.dampening();
      c->sgd.nesterov = s.nesterov();
      c->sgd.weight_decay = s.weight_decay();
      return Status::Ok();
    }
    case v1::OptimizerSpec::kAdam: {
      const v1::AdamSpec& a = w.adam();
      const std::string g = f + ".adam";
      c->kind = OptimizerKind::kAdam;
      if (!std::isfinite(a.lr()) || a.lr() <= 0.0f) {
        return InvalidArgument(g, ".lr must be > 0, got ", a.lr(),
                               a.lr() == 0.0f ? " (an unset lr reads as 0)" : "");
      }
      c->adam.lr = a.lr();
      if (a.has_beta1()) {
        NORMD_RETURN_IF_ERROR(CheckRange(a.beta1(), 0.0f, 1.0f, false, g + ".beta1"));
        c->adam.beta1 = a.beta1();
      }
      if (a.has_beta2()) {
        NORMD_RETURN_IF_ERROR(CheckRange(a.beta2(), 0.0f, 1.0f, false, g + ".beta2"));
        c->adam.beta2 = a.beta2();
      }
      if (a.has_eps()) {
        NORMD_RETURN_IF_ERROR(CheckNonNegativeFloat(a.eps(), g + ".eps"));
        c->adam.eps = a.eps();
      }
      NORMD_RETURN_IF_ERROR(CheckNonNegativeFloat(a.weight_decay(), g + ".weight_decay"));
      c->adam.weight_decay = a.weight_decay();
      c->adam.decoupled_weight_decay = a.decoupled_weight_decay();
      return Status::Ok();
    }
    case v1::OptimizerSpec::KIND_NOT_SET:
      break;
  }
  return InvalidArgument(f, " must set sgd or adam");
}

Status SpecToConfig(const v1::ModelSpec& spec, ModelConfig* config) {
  *config = ModelConfig();
  if (spec.input_shape_size() == 0 || spec.input_shape_size() >= kMaxRank) {
    return InvalidArgument("spec.input_shape must have 1 to ", kMaxRank - 1,
                           " dimensions (one sample, e.g. [784] or [1, 28, 28]), got ",
                           spec.input_shape_size());
  }
  for (int i = 0; i < spec.input_shape_size(); ++i) {
    NORMD_RETURN_IF_ERROR(CheckSize(spec.input_shape(i), 1, StrCat("spec.input_shape[", i, "]")));
    config->input_shape.push_back(spec.input_shape(i));
  }
  if (spec.layers_size() == 0) {
    return InvalidArgument("spec.layers is empty: a model needs at least one layer");
  }
  config->layers.resize(spec.layers_size());
  for (int i = 0; i < spec.layers_size(); ++i) {
    NORMD_RETURN_IF_ERROR(
        LayerFromWire(spec.layers(i), StrCat("spec.layers[", i, "]"), 0, &config->layers[i]));
  }
  switch (spec.loss()) {
    case v1::LOSS_CROSS_ENTROPY: config->loss = LossKind::kCrossEntropy; break;
    case v1::LOSS_MSE: config->loss = LossKind::kMse; break;
    case v1::LOSS_BCE_WITH_LOGITS: config->loss = LossKind::kBceWithLogits; break;
    case v1::LOSS_UNSPECIFIED:
      return InvalidArgument("spec.loss must be set (LOSS_CROSS_ENTROPY, LOSS_MSE or "
                             "LOSS_BCE_WITH_LOGITS)");
    default:
      return InvalidArgument("spec.loss has an unknown value ", static_cast<int>(spec.loss()));
  }
  if (!spec.has_optimizer()) {
    return InvalidArgument("spec.optimizer must be set (sgd or adam)");
  }
  NORMD_RETURN_IF_ERROR(
      OptimizerSpecToConfig(spec.optimizer(), "spec.optimizer", &config->optimizer));
  if (spec.has_loss_options()) {
    Status s = ValidateLabelSmoothing(config->loss, spec.loss_options().label_smoothing());
    if (!s.ok()) return s.WithPrefix("spec.loss_options");
    config->label_smoothing = spec.loss_options().label_smoothing();
  }
  config->seed = spec.seed();
  return Status::Ok();
}

Status DecodeTensor(const v1::Tensor& wire, std::string_view field, int64_t max_elements,
                    DecodedTensor* out) {
  int64_t count = 0;
  NORMD_RETURN_IF_ERROR(CheckEncoding(wire, field, &count));
  Shape shape;
  NORMD_RETURN_IF_ERROR(ShapeFromWire(wire, field, &shape));
  const int64_t expected = shape.NumElements();
  if (expected > max_elements) {
    return ResourceExhausted(field, " has shape ", shape.ToString(), " (", expected,
                             " elements), more than the limit of ", max_elements,
                             " elements per tensor");
  }
  if (count != expected) {
    return InvalidArgument(field, " has ", count, " values but its shape ", shape.ToString(),
                           " needs ", expected);
  }
  out->raw_ = !wire.raw().empty();
  out->copy_.clear();
  out->view_.shape = shape;
  if (!out->raw_) {
    out->view_.data = wire.values().data();
    return Status::Ok();
  }
  const char* bytes = wire.raw().data();
  if (kHostLittleEndian && reinterpret_cast<uintptr_t>(bytes) % alignof(float) == 0) {
    out->view_.data = reinterpret_cast<const float*>(bytes);
    return Status::Ok();
  }
  out->copy_.resize(count);
  if (kHostLittleEndian) {
    std::memcpy(out->copy_.data(), bytes, count * sizeof(float));
  } else {
    for (int64_t i = 0; i < count; ++i) {
      const auto* b = reinterpret_cast<const unsigned char*>(bytes) + 4 * i;
      const uint32_t u = uint32_t{b[0]} | uint32_t{b[1]} << 8 | uint32_t{b[2]} << 16 |
                         uint32_t{b[3]} << 24;
      std::memcpy(&out->copy_[i], &u, sizeof(float));
    }
  }
  out->view_.data = out->copy_.data();
  return Status::Ok();
}

void EncodeTensor(const float* data, const Shape& shape, bool raw, v1::Tensor* out) {
  out->Clear();
  for (int64_t d : shape) out->add_shape(d);
  const int64_t n = shape.NumElements();
  if (raw) {
    std::string* bytes = out->mutable_raw();
    bytes->resize(n * sizeof(float));
    if (kHostLittleEndian) {
      // An empty tensor may come with null pointers, which memcpy must not get even for 0 bytes.
      if (n > 0) std::memcpy(bytes->data(), data, n * sizeof(float));
    } else {
      for (int64_t i = 0; i < n; ++i) {
        uint32_t u;
        std::memcpy(&u, &data[i], sizeof(float));
        for (int k = 0; k < 4; ++k) (*bytes)[4 * i + k] = static_cast<char>(u >> (8 * k));
      }
    }
  } else {
    google::protobuf::RepeatedField<float>* values = out->mutable_values();
    values->Resize(static_cast<int>(n), 0.0f);
    if (n > 0) std::memcpy(values->mutable_data(), data, n * sizeof(float));
  }
}

Status DecodeTargets(const google::protobuf::RepeatedField<int64_t>& labels,
                     const v1::Tensor* target, int64_t max_elements, DecodedTargets* out) {
  if (labels.size() > 0 && target != nullptr) {
    return InvalidArgument("labels and target are both set; cross-entropy takes labels, "
                           "MSE and BCE-with-logits take target");
  }
  if (labels.size() > max_elements) {
    return ResourceExhausted("labels has ", labels.size(), " entries, more than the limit of ",
                             max_elements);
  }
  out->targets = Targets();
  out->targets.labels = labels.data();
  out->targets.num_labels = labels.size();
  if (target != nullptr) {
    NORMD_RETURN_IF_ERROR(DecodeTensor(*target, "target", max_elements, &out->target));
    out->targets.target = out->target.view();
  }
  return Status::Ok();
}

Status StateFromWire(const v1::ModelState& wire, int64_t max_elements,
                     std::vector<NamedTensor>* out) {
  out->clear();
  out->reserve(wire.tensors_size());
  for (int i = 0; i < wire.tensors_size(); ++i) {
    const v1::NamedTensor& nt = wire.tensors(i);
    const std::string field = StrCat("state.tensors[", i, "] (", nt.name(), ")");
    if (nt.name().empty()) return InvalidArgument("state.tensors[", i, "].name is empty");
    DecodedTensor t;
    NORMD_RETURN_IF_ERROR(DecodeTensor(nt.tensor(), field, max_elements, &t));
    NamedTensor e;
    e.name = nt.name();
    e.shape = t.view().shape;
    e.values.assign(t.view().data, t.view().data + t.view().size());
    out->push_back(std::move(e));
  }
  return Status::Ok();
}

void StateToWire(const std::vector<NamedTensor>& state, v1::ModelState* out) {
  out->Clear();
  for (const NamedTensor& e : state) {
    v1::NamedTensor* nt = out->add_tensors();
    nt->set_name(e.name);
    EncodeTensor(e.values.data(), e.shape, /*raw=*/false, nt->mutable_tensor());
  }
}

ModelSummary SummarizeModel(const Model& model) {
  ModelSummary s;
  s.training = model.training();
  s.running_stats_frozen = model.running_stats_frozen();
  s.step = model.step();
  s.parameter_count = model.net().parameter_count();
  s.output_shape = model.net().output_shape().ToVector();
  s.batch_norms = model.batch_norm_status();
  s.layer_options = model.layer_options();
  s.inference_only = model.inference_only();
  s.learning_rate = model.learning_rate();
  return s;
}

void ModelToWire(const std::string& id, const v1::ModelSpec& spec, const ModelSummary& summary,
                 v1::Model* out) {
  out->Clear();
  out->set_id(id);
  *out->mutable_spec() = spec;
  out->set_mode(summary.training ? v1::MODE_TRAIN : v1::MODE_EVAL);
  out->set_step(summary.step);
  out->set_parameter_count(summary.parameter_count);
  for (int64_t d : summary.output_shape) out->add_output_shape(d);
  out->set_running_stats_frozen(summary.running_stats_frozen);
  for (const BatchNormStatus& bn : summary.batch_norms) {
    v1::BatchNormStatus* w = out->add_batch_norms();
    w->set_layer(bn.name);
    w->set_num_batches_tracked(static_cast<uint64_t>(bn.num_batches_tracked));
    w->set_last_mean_shift(bn.last_mean_shift);
    w->set_last_var_log_ratio(bn.last_var_log_ratio);
    w->set_running_mean_update_norm(bn.running_mean_update_norm);
    w->set_running_var_update_norm(bn.running_var_update_norm);
  }
  for (const LayerOptionsStatus& o : summary.layer_options) {
    v1::LayerOptions* w = out->add_layer_options();
    w->set_layer(o.name);
    w->set_frozen(o.frozen);
    w->set_trainable(o.trainable);
  }
  out->set_inference_only(summary.inference_only);
  out->set_learning_rate(summary.learning_rate);
}

void LayerOptionsFromWire(const google::protobuf::RepeatedPtrField<v1::LayerOptions>& wire,
                          std::vector<LayerOptionsChange>* out) {
  out->clear();
  for (const v1::LayerOptions& w : wire) {
    LayerOptionsChange c;
    c.layer = w.layer();
    if (w.has_frozen()) c.frozen = w.frozen();
    if (w.has_trainable()) c.trainable = w.trainable();
    out->push_back(std::move(c));
  }
}

namespace {

// Copies the layers of a source stack that survive folding, recursing into residual blocks.
void FoldedStackToWire(const google::protobuf::RepeatedPtrField<v1::LayerSpec>& source,
                       const FoldedStack& folded,
                       google::protobuf::RepeatedPtrField<v1::LayerSpec>* out) {
  for (size_t j = 0; j < folded.source_layer.size(); ++j) {
    v1::LayerSpec* layer = out->Add();
    *layer = source.Get(folded.source_layer[j]);
    if (layer->has_residual()) {
      v1::ResidualSpec* block = layer->mutable_residual();
      block->clear_body();
      block->clear_shortcut();
      const v1::ResidualSpec& src = source.Get(folded.source_layer[j]).residual();
      FoldedStackToWire(src.body(), folded.body[j], block->mutable_body());
      FoldedStackToWire(src.shortcut(), folded.shortcut[j], block->mutable_shortcut());
      continue;
    }
    if (folded.folded_batch_norm[j] < 0) continue;
    if (layer->has_linear()) layer->mutable_linear()->set_bias(true);
    if (layer->has_conv2d()) layer->mutable_conv2d()->set_bias(true);
  }
}

}  // namespace

void FoldedSpecToWire(const v1::ModelSpec& source, const FoldedModel& folded, v1::ModelSpec* out) {
  *out = source;
  out->clear_layers();
  FoldedStackToWire(source.layers(), folded.layers, out->mutable_layers());
}

void LayerStatsToWire(const Sequential& net, const std::vector<LayerActivationStats>& stats,
                      google::protobuf::RepeatedPtrField<v1::LayerStats>* out) {
  out->Clear();
  for (const LayerActivationStats& s : stats) {
    const LayerNode& node = net.node(s.layer);
    v1::LayerStats* w = out->Add();
    w->set_index(s.layer);
    w->set_name(node.label);
    w->set_kind(node.layer->kind_name());
    w->set_input_mean(static_cast<float>(s.input.mean));
    w->set_input_std(static_cast<float>(s.input.std));
    w->set_output_mean(static_cast<float>(s.output.mean));
    w->set_output_std(static_cast<float>(s.output.std));
  }
}

}  // namespace normd::server
