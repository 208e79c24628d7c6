#include "core/sequential.h"

#include <cmath>
#include <set>
#include <utility>

namespace normd {
namespace {

ChannelMoments MomentsOf(const float* data, int64_t n) {
  ChannelMoments r;
  r.count = n;
  r.mean.assign(1, 0.0);
  r.m2.assign(1, 0.0);
  if (n == 0) return r;
  Eigen::Map<const Eigen::VectorXf> v(data, n);
  r.mean[0] = v.cast<double>().sum() / static_cast<double>(n);
  r.m2[0] = (v.cast<double>().array() - r.mean[0]).square().sum();
  return r;
}

}  // namespace

MeanStd MeanStdOf(const ChannelMoments& m) {
  MeanStd r;
  if (m.count == 0) return r;
  r.mean = m.mean[0];
  r.std = std::sqrt(m.m2[0] / static_cast<double>(m.count));
  return r;
}

void ForwardRecord::RetainInput() {
  if (input_.data == input_copy_.data() && input_.data != nullptr) return;
  input_copy_.Resize(input_.shape);
  std::copy(input_.data, input_.data + input_.size(), input_copy_.data());
  input_.data = input_copy_.data();
}

// Builds the layer tree depth first, numbering nodes in PyTorch's module order and checking
// every layer's shape, the names and the limits as it goes.
struct Sequential::Builder {
  Builder(const Limits& l, Sequential* n) : limits(l), net(n) {}

  const Limits& limits;
  Sequential* net;
  int64_t params = 0;
  int layers = 0;
  std::set<std::string> labels;

  // Builds `configs` as one stack reading per-sample shape `in`: the top-level layers
  // (parent < 0), or a branch of the residual block at node `parent`. *out: the stack's
  // output shape.
  Status BuildStack(const std::vector<LayerConfig>& configs, const Shape& in, int parent,
                    ResidualBlock::Branch branch, Shape* out) {
    Shape shape = in;
    int previous = -1;
    for (size_t j = 0; j < configs.size(); ++j) {
      const LayerConfig& config = configs[j];
      std::unique_ptr<Layer> layer = MakeLayer(config);
      const int index = static_cast<int>(net->nodes_.size());
      LayerNode node;
      node.layer = layer.get();
      node.parent = parent;
      node.previous = previous;
      node.input_shape = shape;
      const char* branch_name = branch == ResidualBlock::Branch::kBody ? "body" : "shortcut";
      if (parent < 0) {
        node.path = std::to_string(j);
        node.description = StrCat("layer ", j, " (", layer->kind_name(), ")");
        node.slot = static_cast<int>(j);
      } else {
        const LayerNode& p = net->nodes_[parent];
        node.path = StrCat(p.path, ".", branch_name, ".", j);
        node.description =
            StrCat(p.description, " ", branch_name, " layer ", j, " (", layer->kind_name(), ")");
        node.slot = p.layer->AsResidualBlock()->CacheSlot(branch, static_cast<int>(j));
        node.depth = p.depth + 1;
      }
      node.label = config.name.empty() ? node.path : config.name;
      const std::string description = node.description;
      if (++layers > limits.max_layers) {
        return ResourceExhausted(description, ": the model would have more than ",
                                 limits.max_layers,
                                 " layers (the limit; residual blocks and the "
                                 "layers inside them count)");
      }
      if (!labels.insert(node.label).second) {
        return InvalidArgument(description, ": name '", node.label, "' is used by another layer");
      }
      net->nodes_.push_back(std::move(node));

      Shape next;
      if (ResidualBlock* block = layer->AsResidualBlock()) {
        if (net->nodes_[index].depth + 1 > kMaxResidualDepth) {
          return InvalidArgument(description, ": residual blocks nest more than ",
                                 kMaxResidualDepth, " deep");
        }
        Shape ignored;
        NORMD_RETURN_IF_ERROR(
            BuildStack(config.residual.body, shape, index, ResidualBlock::Branch::kBody, &ignored));
        NORMD_RETURN_IF_ERROR(BuildStack(config.residual.shortcut, shape, index,
                                         ResidualBlock::Branch::kShortcut, &ignored));
        Status s = block->Build(shape, &next);
        if (!s.ok()) return s.WithPrefix(description);
      } else {
        Status s = layer->Build(shape, &next);
        if (!s.ok()) return s.WithPrefix(description);
        // A block's parameters are its layers', counted as those are built.
        const int64_t p = layer->NumParameters();
        params = (p > limits.max_parameters - params) ? limits.max_parameters + 1 : params + p;
        if (params > limits.max_parameters) {
          return ResourceExhausted(description, ": the model would have more than ",
                                   limits.max_parameters, " parameters (the limit)");
        }
      }
      if (next.NumElements() > limits.max_sample_elements) {
        return ResourceExhausted(description, ": output ", next.ToString(), " has more than ",
                                 limits.max_sample_elements, " elements per sample");
      }
      net->nodes_[index].output_shape = next;
      if (layer->AsBatchNorm() != nullptr) net->batch_norm_nodes_.push_back(index);
      if (parent < 0) {
        net->layers_.push_back(std::move(layer));
        net->shapes_.push_back(next);
        net->top_nodes_.push_back(index);
      } else {
        net->nodes_[parent].layer->AsResidualBlock()->Append(branch, std::move(layer), next);
      }
      shape = next;
      previous = index;
    }
    *out = shape;
    return Status::Ok();
  }
};

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

  net->shapes_.push_back(net->input_shape_);
  Builder builder(limits, net.get());
  NORMD_RETURN_IF_ERROR(builder.BuildStack(layers, net->input_shape_, /*parent=*/-1,
                                           ResidualBlock::Branch::kBody, &net->output_shape_));
  net->parameter_count_ = builder.params;

  Rng rng(seed);
  for (auto& layer : net->layers_) layer->Allocate(rng);
  *out = std::move(net);
  return Status::Ok();
}

int Sequential::FindNode(const std::string& label) const {
  for (size_t i = 0; i < nodes_.size(); ++i) {
    if (nodes_[i].label == label) return static_cast<int>(i);
  }
  for (size_t i = 0; i < nodes_.size(); ++i) {
    if (nodes_[i].path == label) return static_cast<int>(i);
  }
  return -1;
}

LayerCache& Sequential::NodeCache(ForwardRecord* rec, int node) const {
  const LayerNode& n = nodes_[node];
  if (n.parent < 0) return rec->caches_[n.slot];
  return NodeCache(rec, n.parent).children[n.slot];
}

const LayerCache& Sequential::NodeCache(const ForwardRecord& rec, int node) const {
  return NodeCache(const_cast<ForwardRecord*>(&rec), node);
}

ConstTensorView Sequential::NodeOutput(const ForwardRecord& rec, int node,
                                       Tensor* scratch) const {
  const LayerNode& n = nodes_[node];
  const LayerCache& cache = NodeCache(rec, node);
  if (cache.relu_fused) {
    n.layer->RecomputeOutput(NodeInput(rec, node, scratch), cache, scratch);
    return scratch->view();
  }
  if (n.parent < 0) return rec.outputs_[n.slot].view();
  return NodeCache(rec, n.parent).outputs[n.slot].view();
}

ConstTensorView Sequential::NodeInput(const ForwardRecord& rec, int node,
                                      Tensor* scratch) const {
  const LayerNode& n = nodes_[node];
  if (n.previous >= 0) return NodeOutput(rec, n.previous, scratch);
  if (n.parent >= 0) return NodeInput(rec, n.parent, scratch);
  return rec.input_;
}

Status Sequential::CheckInput(const Shape& batch, const ForwardContext& ctx) const {
  if (batch.rank() != input_shape_.rank() + 1 || batch.DropFirst() != input_shape_) {
    return InvalidArgument("input has shape ", batch.ToString(), " but the model expects (N, ",
                           input_shape_.ToString().substr(1));
  }
  // A data-parallel shard may be empty (more ranks than rows); the whole batch may not.
  if (ctx.shard.active() ? ctx.shard.global_rows < 1 : batch[0] < 1) {
    return InvalidArgument("input has an empty batch (N = 0)");
  }
  for (const LayerNode& node : nodes_) {
    Status s = node.layer->CheckBatch(node.input_shape.WithBatch(batch[0]), ctx);
    if (!s.ok()) return s.WithPrefix(node.description);
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
  ForwardLayers(layers_, x, lctx, rec->outputs_.data(), rec->caches_.data());
  for (int node : batch_norm_nodes_) {
    ForwardRecord::BatchNormReport r;
    r.layer = node;
    r.drift = BatchNorm::DriftOf(NodeCache(*rec, node));
    rec->bn_reports_.push_back(r);
  }
  rec->rng_after_ = local;
  rec->ctx_.rng = nullptr;  // the caller's generator must not be reached through the record
}

void Sequential::Backward(ForwardRecord* rec, const ConstTensorView& dy, Tensor* dx,
                          BackwardListener* listener) {
  BackwardLayers(layers_, rec->input_, rec->outputs_.data(), rec->caches_.data(), dy, rec->ctx_, dx,
                 &rec->grad_a_, &rec->grad_b_, listener);
}

Rng Sequential::CommitRunningStats(ForwardRecord* rec) {
  for (ForwardRecord::BatchNormReport& r : rec->bn_reports_) {
    LayerCache& cache = NodeCache(rec, r.layer);
    r.committed = cache.has_pending_update;
    r.update = nodes_[r.layer].layer->AsBatchNorm()->Commit(&cache);
  }
  for (size_t i = 0; i < nodes_.size(); ++i) {
    Layer* layer = nodes_[i].layer;
    if (layer->AsBatchNorm() != nullptr || layer->AsResidualBlock() != nullptr) continue;
    LayerCache& cache = NodeCache(rec, static_cast<int>(i));
    if (cache.has_pending_update) layer->ApplyPendingUpdate(&cache);
  }
  return rec->rng_after_;
}

void Sequential::ZeroGrad() {
  for (Parameter* p : parameters()) p->grad.SetZero();
}

int Sequential::FirstNonFiniteGradLayer() {
  for (size_t i = 0; i < nodes_.size(); ++i) {
    if (nodes_[i].layer->AsResidualBlock() != nullptr) continue;
    for (Parameter* p : nodes_[i].layer->parameters()) {
      if (!p->grad.AllFinite()) return static_cast<int>(i);
    }
  }
  return -1;
}

// The walks below visit the leaves of the tree (every node but the blocks, whose parameters
// and state are their layers'), in node order: PyTorch's order.

std::vector<Parameter*> Sequential::parameters() {
  std::vector<Parameter*> all;
  for (const LayerNode& node : nodes_) {
    if (node.layer->AsResidualBlock() != nullptr) continue;
    for (Parameter* p : node.layer->parameters()) all.push_back(p);
  }
  return all;
}

std::vector<bool> Sequential::parameter_trainable() {
  std::vector<bool> all;
  for (const LayerNode& node : nodes_) {
    if (node.layer->AsResidualBlock() != nullptr) continue;
    for (size_t j = 0; j < node.layer->parameters().size(); ++j) {
      all.push_back(node.layer->trainable());
    }
  }
  return all;
}

std::vector<std::string> Sequential::parameter_names() {
  std::vector<std::string> names;
  for (const LayerNode& node : nodes_) {
    if (node.layer->AsResidualBlock() != nullptr) continue;
    for (Parameter* p : node.layer->parameters()) names.push_back(StrCat(node.path, ".", p->name));
  }
  return names;
}

std::vector<StateSlot> Sequential::state() {
  std::vector<StateSlot> all;
  for (const LayerNode& node : nodes_) {
    if (node.layer->AsResidualBlock() != nullptr) continue;
    for (StateSlot& s : node.layer->state()) {
      s.name = StrCat(node.path, ".", s.name);
      all.push_back(std::move(s));
    }
  }
  return all;
}

void Sequential::ResetRunningStats() {
  for (const LayerNode& node : nodes_) node.layer->ResetRunningStats();
}

std::vector<LayerActivationStats> Sequential::ActivationStats(const ForwardRecord& rec) const {
  std::vector<LayerActivationStats> stats;
  for (const LayerActivationMoments& m : ActivationMoments(rec)) {
    stats.push_back({m.layer, MeanStdOf(m.input), MeanStdOf(m.output)});
  }
  return stats;
}

std::vector<LayerActivationMoments> Sequential::ActivationMoments(const ForwardRecord& rec) const {
  std::vector<LayerActivationMoments> moments(nodes_.size());
  Tensor scratch;
  for (size_t i = 0; i < nodes_.size(); ++i) {
    moments[i].layer = static_cast<int>(i);
    const ConstTensorView in = NodeInput(rec, static_cast<int>(i), &scratch);
    moments[i].input = MomentsOf(in.data, in.size());
    const ConstTensorView out = NodeOutput(rec, static_cast<int>(i), &scratch);
    moments[i].output = MomentsOf(out.data, out.size());
  }
  return moments;
}

}  // namespace normd
