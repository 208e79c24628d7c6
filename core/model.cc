#include "core/model.h"

#include <cassert>
#include <cmath>
#include <map>
#include <utility>

#include "core/clip_grad.h"

namespace normd {
namespace {

// Dropout draws come from a generator distinct from the one that initialised the weights.
constexpr uint64_t kDropoutSeedSalt = 0x6e6f726d64726f70ULL;  // "normdrop"

// A counter (num_batches_tracked, optimizer steps) the int64 it is stored in can hold: values
// from 2^63 on would make the conversion undefined.
bool IsNonNegativeInteger(float v) {
  return v >= 0.0f && v < 9.2233720368547758e18f && std::floor(v) == v;
}

// The layer configurations in Sequential's node order: a block, then its body's layers, then
// its shortcut's.
void AppendNodeConfigs(const std::vector<LayerConfig>& layers,
                       std::vector<const LayerConfig*>* out) {
  for (const LayerConfig& l : layers) {
    out->push_back(&l);
    if (l.kind == LayerKind::kResidual) {
      AppendNodeConfigs(l.residual.body, out);
      AppendNodeConfigs(l.residual.shortcut, out);
    }
  }
}

}  // namespace

Status Model::Create(const ModelConfig& config, const Sequential::Limits& limits,
                     std::unique_ptr<Model>* out) {
  Status s = Optimizer::Validate(config.optimizer);
  if (!s.ok()) return s.WithPrefix("optimizer");
  s = ValidateLabelSmoothing(config.loss, config.label_smoothing);
  if (!s.ok()) return s;
  std::unique_ptr<Model> model(new Model());
  model->config_ = config;
  NORMD_RETURN_IF_ERROR(
      Sequential::Create(config.input_shape, config.layers, config.seed, limits, &model->net_));
  NORMD_RETURN_IF_ERROR(ValidateLossForOutput(config.loss, model->net_->output_shape()));
  // Per parameter, in parameters()' order (node order): whether the recipe's parameter groups
  // exempt it from weight decay. Nested layers are judged by their own kind, not their block's.
  std::vector<const LayerConfig*> node_configs;
  AppendNodeConfigs(config.layers, &node_configs);
  assert(static_cast<int>(node_configs.size()) == model->net_->num_nodes());
  std::vector<bool> norm_or_bias;
  for (int i = 0; i < model->net_->num_nodes(); ++i) {
    Layer* layer = model->net_->node(i).layer;
    if (layer->AsResidualBlock() != nullptr) continue;  // its layers are nodes of their own
    const bool norm = IsNormLayerKind(node_configs[i]->kind);
    for (const Parameter* p : layer->parameters()) {
      norm_or_bias.push_back(norm || p->name == "bias");
    }
  }
  model->optimizer_ = std::make_unique<Optimizer>(config.optimizer, model->net_->parameters(),
                                                  std::move(norm_or_bias));
  model->trainable_mask_ = model->net_->parameter_trainable();
  model->rng_.Seed(config.seed ^ kDropoutSeedSalt);
  for (int i = 0; i < model->net_->num_nodes(); ++i) {
    if (model->net_->node(i).layer->AsBatchNorm() == nullptr) continue;
    BatchNormStatus st;
    st.layer = i;
    st.name = model->net_->node(i).label;
    model->status_.push_back(st);
  }
  *out = std::move(model);
  return Status::Ok();
}

void Model::SetMode(bool training, bool freeze_running_stats) {
  if (training != training_) ++mode_version_;
  training_ = training;
  frozen_ = freeze_running_stats;
}

ForwardContext Model::CurrentModeContext() {
  ForwardContext ctx;
  ctx.training = training_;
  ctx.update_running_stats = training_ && !frozen_;
  ctx.rng = &rng_;
  return ctx;
}

Status Model::CheckInput(const ConstTensorView& x, bool training,
                         const DataParallelShard& shard) const {
  ForwardContext ctx;
  ctx.training = training;
  ctx.shard = shard;
  NORMD_RETURN_IF_ERROR(net_->CheckInput(x.shape, ctx));
  if (!AllFinite(x.data, x.size())) {
    return InvalidArgument("input contains non-finite values (NaN or Inf)");
  }
  return Status::Ok();
}

Status Model::Forward(const ConstTensorView& x, ForwardRecord* rec,
                      const DataParallelShard& shard) {
  NORMD_RETURN_IF_ERROR(CheckInput(x, training_, shard));
  ForwardContext ctx = CurrentModeContext();
  ctx.shard = shard;
  net_->Forward(x, ctx, rec);
  if (training_) rng_ = net_->CommitRunningStats(rec);
  rec->params_version = params_version_;
  rec->mode_version = mode_version_;
  RecordStatus(*rec);
  return Status::Ok();
}

Status Model::Backward(ForwardRecord* rec, const ConstTensorView& grad_output,
                       Tensor* grad_input) {
  NORMD_RETURN_IF_ERROR(CheckCanTrain("Backward"));
  if (rec->mode_version != mode_version_) {
    return FailedPrecondition("the forward is stale: the model switched mode (or a layer was "
                              "frozen or unfrozen) since it ran; run Forward again");
  }
  if (rec->params_version != params_version_) {
    return FailedPrecondition("the forward is stale: the parameters changed since it ran "
                              "(an optimizer step or SetState); run Forward again");
  }
  if (grad_output.shape != rec->output().shape()) {
    return InvalidArgument("grad_output has shape ", grad_output.shape.ToString(),
                           " but the forward's output has shape ",
                           rec->output().shape().ToString());
  }
  if (!AllFinite(grad_output.data, grad_output.size())) {
    return InvalidArgument("grad_output contains non-finite values (NaN or Inf)");
  }
  grads_zero_ = false;
  net_->Backward(rec, grad_output, grad_input);
  return Status::Ok();
}

int Model::CheckGradients(double* norm) const {
  *norm = GradNorm(net_->parameters(), trainable_mask_);
  // In double a sum of squares of finite floats cannot overflow, so it is finite exactly when
  // every included gradient is; the others (untrainable layers') are kept at zero.
  if (std::isfinite(*norm)) return -1;
  const int bad = net_->FirstNonFiniteGradLayer();
  return bad >= 0 ? bad : 0;
}

StepResult Model::Step(double grad_norm) {
  StepResult r;
  const std::vector<Parameter*> params = net_->parameters();
  const double max_norm = optimizer_->config().max_grad_norm;
  if (max_norm > 0.0) ClipGradsToNorm(params, trainable_mask_, max_norm, grad_norm);
  r.grad_norm = grad_norm;
  r.learning_rate = optimizer_->Step(params, trainable_mask_);
  ZeroGradients();
  ++step_;
  ++params_version_;
  r.step = step_;
  return r;
}

Status Model::ApplyGradients(StepResult* result, Collective* collective) {
  NORMD_RETURN_IF_ERROR(CheckCanTrain("ApplyGradients"));
  if (collective != nullptr) {
    // Every bucket starts at once: the accumulated gradients are all final.
    Buckets()->Begin(collective);
    Buckets()->Finish();
  }
  double norm = 0.0;
  const int bad = CheckGradients(&norm);
  if (bad >= 0) {
    ZeroGradients();
    return FailedPrecondition("step ", step_ + 1, " produced non-finite gradients in ",
                              net_->node(bad).description,
                              "; model unchanged, accumulated gradients discarded");
  }
  *result = Step(norm);
  return Status::Ok();
}

Status Model::TrainStep(const ConstTensorView& x, const Targets& targets, ForwardRecord* rec,
                        TrainResult* result, const DataParallelShard& shard) {
  NORMD_RETURN_IF_ERROR(CheckCanTrain("TrainStep"));
  NORMD_RETURN_IF_ERROR(CheckInput(x, training_, shard));
  if (!shard.active() || x.rows() > 0) {
    NORMD_RETURN_IF_ERROR(
        ValidateTargets(config_.loss, net_->output_shape().WithBatch(x.rows()), targets));
  }
  ForwardContext ctx = CurrentModeContext();
  ctx.shard = shard;
  if (!grads_zero_) ZeroGradients();
  net_->Forward(x, ctx, rec);
  // Data-parallel: this shard's share of the whole batch's mean loss and of its gradient, then
  // the whole batch's loss and parameter gradients, summed over the ranks (the same bits on
  // every rank, so every rank takes the same decision below).
  double loss = ComputeLoss(config_.loss, rec->output().view(), targets, &loss_grad_,
                            config_.label_smoothing, shard.global_rows);
  if (shard.active()) shard.collective->AllReduceSum(&loss, 1);
  if (!std::isfinite(loss)) {
    return FailedPrecondition("step ", step_ + 1, " produced a non-finite loss (", loss,
                              "); model unchanged");
  }
  grads_zero_ = false;
  if (shard.active()) {
    // The gradients' sum over the ranks travels while the backward pass goes on below.
    Buckets()->Begin(shard.collective);
    net_->Backward(rec, loss_grad_.view(), nullptr, Buckets());
    Buckets()->Finish();
  } else {
    net_->Backward(rec, loss_grad_.view(), nullptr);
  }
  double norm = 0.0;
  const int bad = CheckGradients(&norm);
  if (bad >= 0) {
    ZeroGradients();
    return FailedPrecondition("step ", step_ + 1, " produced non-finite gradients in ",
                              net_->node(bad).description, "; model unchanged");
  }
  // Commit: nothing below can fail.
  const StepResult step = Step(norm);
  if (training_) rng_ = net_->CommitRunningStats(rec);
  rec->params_version = params_version_;
  rec->mode_version = mode_version_;
  RecordStatus(*rec);
  result->loss = loss;
  result->step = step.step;
  result->samples = shard.active() ? shard.global_rows : x.rows();
  result->grad_norm = step.grad_norm;
  result->learning_rate = step.learning_rate;
  return Status::Ok();
}

void Model::ZeroGradients() {
  net_->ZeroGrad();
  grads_zero_ = true;
}

GradientBuckets* Model::Buckets() {
  if (buckets_ == nullptr) buckets_ = std::make_unique<GradientBuckets>(net_.get());
  return buckets_.get();
}

Status Model::Evaluate(const ConstTensorView& x, const Targets& targets, ForwardRecord* rec,
                       EvalResult* result, const DataParallelShard& shard) const {
  NORMD_RETURN_IF_ERROR(CheckInput(x, false, shard));
  if (!shard.active() || x.rows() > 0) {
    NORMD_RETURN_IF_ERROR(
        ValidateTargets(config_.loss, net_->output_shape().WithBatch(x.rows()), targets));
  }
  ForwardContext ctx;  // eval semantics
  ctx.shard = shard;
  net_->Forward(x, ctx, rec);
  const bool classes = config_.loss == LossKind::kCrossEntropy;
  // [loss share, correct predictions]: summed over the ranks when data-parallel.
  double figures[2] = {
      ComputeLoss(config_.loss, rec->output().view(), targets, nullptr,
                  config_.label_smoothing, shard.global_rows),
      classes ? static_cast<double>(CorrectPredictions(rec->output().view(), targets)) : 0.0};
  if (shard.active()) shard.collective->AllReduceSum(figures, 2);
  const int64_t rows = shard.active() ? shard.global_rows : x.rows();
  result->loss = figures[0];
  result->accuracy = classes && rows > 0 ? figures[1] / static_cast<double>(rows) : 0.0;
  result->samples = rows;
  return Status::Ok();
}

Status Model::Predict(const ConstTensorView& x, ForwardRecord* rec) const {
  NORMD_RETURN_IF_ERROR(CheckInput(x, false));
  ForwardContext ctx;
  net_->Forward(x, ctx, rec);
  return Status::Ok();
}

Status Model::AccumulateStatistics(const ConstTensorView& x, StatisticsAccumulator* acc) const {
  NORMD_RETURN_IF_ERROR(CheckCanTrain("AdaptStatistics"));
  if (acc->batches == 0) {
    acc->layers.clear();
    acc->pooled.clear();
    for (int i = 0; i < net_->num_nodes(); ++i) {
      const BatchNorm* bn = net_->node(i).layer->AsBatchNorm();
      if (bn != nullptr && bn->tracks_running_stats() && !bn->frozen()) acc->layers.push_back(i);
    }
    if (acc->layers.empty()) {
      return FailedPrecondition("the model has no BatchNorm layer with running statistics to "
                                "adapt (frozen layers keep theirs)");
    }
    acc->params_version = params_version_;
    acc->mode_version = mode_version_;
  } else if (acc->params_version != params_version_ || acc->mode_version != mode_version_) {
    return Aborted("the model changed (trained, its state set, or its mode or a frozen flag "
                   "switched) during the adaptation; nothing was changed, start it again");
  }
  NORMD_RETURN_IF_ERROR(CheckInput(x, /*training=*/true));
  ForwardContext ctx;
  ctx.training = true;
  ctx.adapting = true;
  net_->Forward(x, ctx, &acc->scratch);
  acc->pooled.resize(acc->layers.size());
  for (size_t k = 0; k < acc->layers.size(); ++k) {
    const int i = acc->layers[k];
    const ChannelMoments batch = net_->node(i).layer->AsBatchNorm()->BatchMomentsOf(
        net_->NodeCache(acc->scratch, i), x.rows());
    if (acc->batches == 0) {
      acc->pooled[k] = batch;
    } else {
      CombineMoments(&acc->pooled[k], batch);
    }
  }
  ++acc->batches;
  acc->samples += x.rows();
  return Status::Ok();
}

Status Model::CommitStatistics(const StatisticsAccumulator& acc) {
  if (acc.batches == 0) return InvalidArgument("no batch was sent: nothing to adapt to");
  if (acc.params_version != params_version_ || acc.mode_version != mode_version_) {
    return Aborted("the model changed (trained, its state set, or its mode or a frozen flag "
                   "switched) during the adaptation; nothing was changed, start it again");
  }
  for (size_t k = 0; k < acc.layers.size(); ++k) {
    net_->node(acc.layers[k]).layer->AsBatchNorm()->ReplaceRunningStats(acc.pooled[k], acc.batches);
  }
  return Status::Ok();
}

std::vector<SmallBatchReport> Model::SmallBatches(const ForwardRecord& rec,
                                                 int64_t threshold) const {
  std::vector<SmallBatchReport> out;
  if (threshold <= 0 || !rec.context().training) return out;
  for (const ForwardRecord::BatchNormReport& r : rec.batch_norms()) {
    const BatchNorm* bn = net_->node(r.layer).layer->AsBatchNorm();
    if (!bn->UsesBatchStatistics(rec.context())) continue;
    // A data-parallel shard's layer normalised with the whole batch's statistics.
    const DataParallelShard& shard = rec.context().shard;
    const int64_t values =
        bn->ValuesPerChannel(shard.active() ? shard.global_rows : rec.batch_size());
    if (values < threshold) out.push_back({r.layer, net_->node(r.layer).label, values});
  }
  return out;
}

Status Model::UpdateOptimizer(const OptimizerConfig& config) {
  Status s = optimizer_->UpdateConfig(config);
  if (!s.ok()) return s.WithPrefix("optimizer");
  config_.optimizer = config;
  return Status::Ok();
}

std::vector<StateSlot> Model::Slots(bool include_optimizer) {
  std::vector<StateSlot> slots = net_->state();
  if (include_optimizer) {
    const std::vector<std::string> names = net_->parameter_names();
    for (size_t i = 0; i < names.size(); ++i) {
      for (StateSlot& s : optimizer_->state(i)) {
        s.name = StrCat("optimizer.", names[i], ".", s.name);
        slots.push_back(std::move(s));
      }
    }
    for (StateSlot& s : optimizer_->schedule_state()) {
      s.name = StrCat("optimizer.", s.name);
      slots.push_back(std::move(s));
    }
  }
  return slots;
}

std::vector<NamedTensor> Model::GetState(bool include_optimizer) const {
  std::vector<NamedTensor> out;
  for (const StateSlot& s : const_cast<Model*>(this)->Slots(include_optimizer)) {
    NamedTensor t;
    t.name = s.name;
    if (s.tensor != nullptr) {
      t.shape = s.tensor->shape();
      t.values.assign(s.tensor->data(), s.tensor->data() + s.tensor->size());
    } else {
      t.values.push_back(static_cast<float>(*s.counter));
    }
    out.push_back(std::move(t));
  }
  return out;
}

Status Model::SetState(const std::vector<NamedTensor>& entries, bool strict) {
  std::vector<StateSlot> slots = Slots(true);
  std::map<std::string, const StateSlot*> by_name;
  for (const StateSlot& s : slots) by_name[s.name] = &s;

  // Validate everything before writing anything.
  std::map<std::string, const NamedTensor*> given;
  for (size_t i = 0; i < entries.size(); ++i) {
    const NamedTensor& e = entries[i];
    auto it = by_name.find(e.name);
    if (it == by_name.end()) {
      return InvalidArgument("state entry '", e.name, "' is not part of this model");
    }
    if (!given.emplace(e.name, &e).second) {
      return InvalidArgument("state entry '", e.name, "' is given twice");
    }
    const StateSlot& slot = *it->second;
    const Shape expected = slot.tensor != nullptr ? slot.tensor->shape() : Shape();
    if (e.shape != expected) {
      return InvalidArgument("state entry '", e.name, "' has shape ", e.shape.ToString(),
                             " but the model expects ", expected.ToString());
    }
    if (static_cast<int64_t>(e.values.size()) != expected.NumElements()) {
      return InvalidArgument("state entry '", e.name, "' has ", e.values.size(),
                             " values but its shape ", expected.ToString(), " needs ",
                             expected.NumElements());
    }
    if (!AllFinite(e.values.data(), static_cast<int64_t>(e.values.size()))) {
      return InvalidArgument("state entry '", e.name, "' contains non-finite values");
    }
    if (slot.counter != nullptr && !IsNonNegativeInteger(e.values[0])) {
      return InvalidArgument("state entry '", e.name, "' must be a non-negative integer, got ",
                             e.values[0]);
    }
  }
  if (strict) {
    for (const StateSlot& s : slots) {
      if (s.name.rfind("optimizer.", 0) == 0) continue;
      if (given.count(s.name) == 0) {
        return InvalidArgument("state entry '", s.name, "' is missing (strict)");
      }
    }
  }

  bool params_written = false;
  for (const auto& [name, e] : given) {
    const StateSlot& slot = *by_name[name];
    if (slot.tensor != nullptr) {
      std::copy(e->values.begin(), e->values.end(), slot.tensor->data());
      params_written = true;
    } else {
      *slot.counter = static_cast<int64_t>(e->values[0]);
    }
  }
  if (params_written) ++params_version_;
  return Status::Ok();
}

void Model::ResetRunningStats() {
  net_->ResetRunningStats();
  std::lock_guard<std::mutex> lock(status_mu_);
  for (BatchNormStatus& st : status_) {
    st.last_mean_shift = st.last_var_log_ratio = 0.0f;
    st.running_mean_update_norm = st.running_var_update_norm = 0.0f;
  }
}

int Model::FindLayer(const std::string& label) const { return net_->FindNode(label); }

Status Model::CheckCanTrain(const char* what) const {
  if (!inference_only_) return Status::Ok();
  return FailedPrecondition(what, " is refused: the model is inference-only (a FoldBatchNorm "
                            "copy serves eval-mode calls only)");
}

Status Model::SetLayerOptions(const std::vector<LayerOptionsChange>& changes,
                              bool* frozen_changed) {
  *frozen_changed = false;
  NORMD_RETURN_IF_ERROR(CheckCanTrain("SetLayerOptions"));
  // Validate every change first. A change naming a residual block applies to the layers inside
  // it that can take it, as PyTorch's block.eval() and block.requires_grad_(False) do.
  struct Target {
    Layer* layer;
    bool frozen;     // the change's frozen applies to it
    bool trainable;  // the change's trainable applies to it
  };
  std::vector<std::vector<Target>> targets(changes.size());
  for (size_t k = 0; k < changes.size(); ++k) {
    const LayerOptionsChange& c = changes[k];
    const int i = FindLayer(c.layer);
    if (i < 0) {
      return InvalidArgument("layers[", k, "]: the model has no layer '", c.layer,
                             "' (a layer is named by its configured name or its path: its index ",
                             "0 to ", net_->num_layers() - 1,
                             ", or a path into a residual block such as '4.body.1')");
    }
    const LayerNode& node = net_->node(i);
    const bool block = node.layer->AsResidualBlock() != nullptr;
    bool any_params = false, any_stats = false;
    for (int j = i; j < net_->num_nodes(); ++j) {
      const LayerNode& inner = net_->node(j);
      if (j > i && inner.depth <= node.depth) break;  // past the block's layers
      if (inner.layer->AsResidualBlock() != nullptr) continue;
      const bool params = inner.layer->NumParameters() > 0;
      const bool stats = inner.layer->HasRunningStats();
      any_params = any_params || params;
      any_stats = any_stats || stats;
      // A layer named itself takes both options; inside a block, each goes to the layers it
      // means something for.
      if (!block) {
        targets[k].push_back({inner.layer, true, true});
      } else if (params || stats) {
        targets[k].push_back({inner.layer, stats, params});
      }
    }
    if (!any_params && !any_stats) {
      return InvalidArgument("layers[", k, "]: layer '", c.layer, "' (", node.layer->kind_name(),
                             block ? ") holds no layer with parameters or running statistics"
                                   : ") has neither parameters nor running statistics");
    }
    if (c.frozen.value_or(false) && !any_stats) {
      return InvalidArgument("layers[", k, "]: layer '", c.layer, "' (", node.layer->kind_name(),
                             ")", block ? " holds no layer that" : "",
                             " cannot be frozen: only a norm layer with running statistics can "
                             "(track_running_stats)");
    }
  }
  for (size_t k = 0; k < changes.size(); ++k) {
    for (const Target& t : targets[k]) {
      Layer& layer = *t.layer;
      if (t.frozen && changes[k].frozen.has_value() && *changes[k].frozen != layer.frozen()) {
        layer.set_frozen(*changes[k].frozen);
        *frozen_changed = true;
      }
      if (t.trainable && changes[k].trainable.has_value()) {
        layer.set_trainable(*changes[k].trainable);
        if (!layer.trainable()) {
          for (Parameter* p : layer.parameters()) p->grad.SetZero();
        }
      }
    }
  }
  if (*frozen_changed) ++mode_version_;
  trainable_mask_ = net_->parameter_trainable();
  return Status::Ok();
}

std::vector<LayerOptionsStatus> Model::layer_options() const {
  std::vector<LayerOptionsStatus> out;
  for (int i = 0; i < net_->num_nodes(); ++i) {
    const Layer& layer = *net_->node(i).layer;
    if (layer.AsResidualBlock() != nullptr) continue;
    if (layer.NumParameters() == 0 && !layer.HasRunningStats()) continue;
    out.push_back(LayerOptionsStatus{i, net_->node(i).label, layer.frozen(), layer.trainable()});
  }
  return out;
}

void Model::RecordStatus(const ForwardRecord& rec) const {
  std::lock_guard<std::mutex> lock(status_mu_);
  const auto& reports = rec.batch_norms();
  for (size_t j = 0; j < reports.size() && j < status_.size(); ++j) {
    const ForwardRecord::BatchNormReport& r = reports[j];
    BatchNormStatus& st = status_[j];
    if (r.drift.valid) {
      st.last_mean_shift = static_cast<float>(r.drift.mean_shift);
      st.last_var_log_ratio = static_cast<float>(r.drift.var_log_ratio);
    }
    if (r.committed) {
      st.running_mean_update_norm = static_cast<float>(r.update.running_mean_update_norm);
      st.running_var_update_norm = static_cast<float>(r.update.running_var_update_norm);
    }
  }
}

std::vector<BatchNormStatus> Model::batch_norm_status() const {
  std::vector<BatchNormStatus> out;
  {
    std::lock_guard<std::mutex> lock(status_mu_);
    out = status_;
  }
  for (BatchNormStatus& st : out) {
    st.num_batches_tracked = net_->node(st.layer).layer->AsBatchNorm()->num_batches_tracked();
  }
  return out;
}

}  // namespace normd
