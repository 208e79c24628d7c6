#include "core/sequential.h"

#include <cmath>
#include <set>
#include <utility>

namespace normd {
namespace {

MeanStd MeanStdOf(const float* data, int64_t n) {
  MeanStd r;
  if (n == 0) return r;
  Eigen::Map<const Eigen::VectorXf> v(data, n);
  r.mean = v.cast<double>().sum() / static_cast<double>(n);
  const double m2 = (v.cast<double>().array() - r.mean).square().sum();
  r.std = std::sqrt(m2 / static_cast<double>(n));
  return r;
}

std::string LayerPrefix(int i, const Layer& layer) {
  return StrCat("layer ", i, " (", layer.kind_name(), ")");
}

}  // namespace

void ForwardRecord::RetainInput() {
  if (input_.data == input_copy_.data() && input_.data != nullptr) return;
  input_copy_.Resize(input_.shape);
  std::copy(input_.data, input_.data + input_.size(), input_copy_.data());
  input_.data = input_copy_.data();
}

Status Sequential::Create(const std::vector<int64_t>& input_shape,
                          const std::vector<LayerConfig>& layers, uint64_t seed,
                          const Limits& limits, std::unique_ptr<Sequential>* out) {
  std::unique_ptr<Sequential> net(new Sequential());
  if (input_shape.empty() || input_shape.size() >= static_cast<size_t>(kMaxRank)) {
    return InvalidArgument("input_shape must have 1 to ", kMaxRank - 1,
                           " dimensions (one sample), got ", input_shape.size());
  }
  Shape::FromVector(input_shape, &net->input_shape_);
  for (int i = 0; i < net->input_shape_.rank(); ++i) {
    if (net->input_shape_[i] <= 0) {
      return InvalidArgument("input_shape[", i, "] must be positive, got ",
                             net->input_shape_[i]);
    }
  }
  if (net->input_shape_.NumElements() > limits.max_sample_elements) {
    return ResourceExhausted("input_shape ", net->input_shape_.ToString(), " has more than ",
                             limits.max_sample_elements, " elements per sample");
  }
  if (layers.empty()) return InvalidArgument("layers is empty: a model needs at least one layer");
  if (layers.size() > static_cast<size_t>(limits.max_layers)) {
    return ResourceExhausted("the model has ", layers.size(), " layers, more than the limit of ",
                             limits.max_layers);
  }

  Shape shape = net->input_shape_;
  net->shapes_.push_back(shape);
  std::set<std::string> seen_names;
  int64_t params = 0;
  for (size_t i = 0; i < layers.size(); ++i) {
    const int index = static_cast<int>(i);
    std::unique_ptr<Layer> layer = MakeLayer(layers[i]);
    Shape next;
    Status s = layer->Build(shape, &next);
    if (!s.ok()) return s.WithPrefix(LayerPrefix(index, *layer));
    if (next.NumElements() > limits.max_sample_elements) {
      return ResourceExhausted(LayerPrefix(index, *layer), ": output ", next.ToString(),
                               " has more than ", limits.max_sample_elements,
                               " elements per sample");
    }
    const int64_t p = layer->NumParameters();
    params = (p > limits.max_parameters - params) ? limits.max_parameters + 1 : params + p;
    if (params > limits.max_parameters) {
      return ResourceExhausted(LayerPrefix(index, *layer), ": the model would have more than ",
                               limits.max_parameters, " parameters (the limit)");
    }
    std::string name = layers[i].name.empty() ? std::to_string(i) : layers[i].name;
    if (!seen_names.insert(name).second) {
      return InvalidArgument(LayerPrefix(index, *layer), ": name '", name,
                             "' is used by another layer");
    }
    net->names_.push_back(std::move(name));
    net->layers_.push_back(std::move(layer));
    net->shapes_.push_back(next);
    shape = next;
  }
  net->output_shape_ = shape;
  net->parameter_count_ = params;

  Rng rng(seed);
  for (auto& layer : net->layers_) layer->Allocate(rng);
  *out = std::move(net);
  return Status::Ok();
}

Status Sequential::CheckInput(const Shape& batch, const ForwardContext& ctx) const {
  if (batch.rank() != input_shape_.rank() + 1 || batch.DropFirst() != input_shape_) {
    return InvalidArgument("input has shape ", batch.ToString(), " but the model expects (N, ",
                           input_shape_.ToString().substr(1));
  }
  if (batch[0] < 1) return InvalidArgument("input has an empty batch (N = 0)");
  Shape shape = batch;
  for (size_t i = 0; i < layers_.size(); ++i) {
    Status s = layers_[i]->CheckBatch(shape, ctx);
    if (!s.ok()) return s.WithPrefix(LayerPrefix(static_cast<int>(i), *layers_[i]));
    shape = shapes_[i + 1].WithBatch(batch[0]);
  }
  return Status::Ok();
}

void Sequential::Forward(const ConstTensorView& x, const ForwardContext& ctx,
                         ForwardRecord* rec) const {
  const size_t n = layers_.size();
  rec->ctx_ = ctx;
  rec->input_ = x;
  rec->outputs_.resize(n);
  rec->caches_.resize(n);
  rec->bn_reports_.clear();
  Rng local = ctx.rng != nullptr ? *ctx.rng : Rng();
  ForwardContext lctx = ctx;
  lctx.rng = &local;
  for (size_t i = 0; i < n; ++i) {
    const ConstTensorView in = i == 0 ? x : rec->outputs_[i - 1].view();
    layers_[i]->Forward(in, &rec->outputs_[i], &rec->caches_[i], lctx);
    if (layers_[i]->AsBatchNorm() != nullptr) {
      ForwardRecord::BatchNormReport r;
      r.layer = static_cast<int>(i);
      r.drift = BatchNorm::DriftOf(rec->caches_[i]);
      rec->bn_reports_.push_back(r);
    }
  }
  rec->rng_after_ = local;
  rec->ctx_.rng = nullptr;  // the caller's generator must not be reached through the record
}

void Sequential::Backward(ForwardRecord* rec, const ConstTensorView& dy, Tensor* dx) {
  const int n = static_cast<int>(layers_.size());
  // Without dx, the layers below the lowest one with trainable parameters need no gradient
  // (PyTorch's autograd stops there too): a frozen backbone costs nothing.
  int stop = 0;
  if (dx == nullptr) {
    stop = n;
    for (int i = 0; i < n; ++i) {
      if (layers_[i]->trainable() && layers_[i]->NumParameters() > 0) {
        stop = i;
        break;
      }
    }
  }
  ConstTensorView grad = dy;
  Tensor* bufs[2] = {&rec->grad_a_, &rec->grad_b_};
  int next = 0;
  for (int i = n - 1; i >= stop; --i) {
    const ConstTensorView in = i == 0 ? rec->input_ : rec->outputs_[i - 1].view();
    Tensor* out = i == stop ? (i == 0 ? dx : nullptr) : bufs[next];
    layers_[i]->Backward(in, rec->outputs_[i], grad, rec->caches_[i], rec->ctx_, out);
    if (!layers_[i]->trainable()) {
      // A layer may have accumulated anyway (Layer::trainable lets it skip, not must).
      for (Parameter* p : layers_[i]->parameters()) p->grad.SetZero();
    }
    if (i > stop) {
      grad = bufs[next]->view();
      next ^= 1;
    }
  }
}

Rng Sequential::CommitRunningStats(ForwardRecord* rec) {
  for (ForwardRecord::BatchNormReport& r : rec->bn_reports_) {
    LayerCache& cache = rec->caches_[r.layer];
    r.committed = cache.has_pending_update;
    r.update = layers_[r.layer]->AsBatchNorm()->Commit(&cache);
  }
  for (size_t i = 0; i < layers_.size(); ++i) {
    if (layers_[i]->AsBatchNorm() == nullptr && rec->caches_[i].has_pending_update) {
      layers_[i]->ApplyPendingUpdate(&rec->caches_[i]);
    }
  }
  return rec->rng_after_;
}

void Sequential::ZeroGrad() {
  for (Parameter* p : parameters()) p->grad.SetZero();
}

int Sequential::FirstNonFiniteGradLayer() {
  for (size_t i = 0; i < layers_.size(); ++i) {
    for (Parameter* p : layers_[i]->parameters()) {
      if (!p->grad.AllFinite()) return static_cast<int>(i);
    }
  }
  return -1;
}

std::vector<Parameter*> Sequential::parameters() {
  std::vector<Parameter*> all;
  for (auto& layer : layers_) {
    for (Parameter* p : layer->parameters()) all.push_back(p);
  }
  return all;
}

std::vector<bool> Sequential::parameter_trainable() {
  std::vector<bool> all;
  for (auto& layer : layers_) {
    for (size_t j = 0; j < layer->parameters().size(); ++j) all.push_back(layer->trainable());
  }
  return all;
}

std::vector<std::string> Sequential::parameter_names() {
  std::vector<std::string> names;
  for (size_t i = 0; i < layers_.size(); ++i) {
    for (Parameter* p : layers_[i]->parameters()) names.push_back(StrCat(i, ".", p->name));
  }
  return names;
}

std::vector<StateSlot> Sequential::state() {
  std::vector<StateSlot> all;
  for (size_t i = 0; i < layers_.size(); ++i) {
    for (StateSlot& s : layers_[i]->state()) {
      s.name = StrCat(i, ".", s.name);
      all.push_back(std::move(s));
    }
  }
  return all;
}

void Sequential::ResetRunningStats() {
  for (auto& layer : layers_) {
    layer->ResetRunningStats();
  }
}

std::vector<LayerActivationStats> Sequential::ActivationStats(const ForwardRecord& rec) const {
  std::vector<LayerActivationStats> stats(layers_.size());
  for (size_t i = 0; i < layers_.size(); ++i) {
    const ConstTensorView in = i == 0 ? rec.input_ : rec.outputs_[i - 1].view();
    stats[i].layer = static_cast<int>(i);
    stats[i].input = MeanStdOf(in.data, in.size());
    stats[i].output = MeanStdOf(rec.outputs_[i].data(), rec.outputs_[i].size());
  }
  return stats;
}

}  // namespace normd
