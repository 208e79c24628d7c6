#include "core/layer.h"

#include <cassert>
#include <cstdlib>

#include "core/activation.h"
#include "core/batch_norm.h"
#include "core/conv2d.h"
#include "core/group_norm.h"
#include "core/instance_norm.h"
#include "core/layer_norm.h"
#include "core/linear.h"
#include "core/pool2d.h"
#include "core/residual.h"

namespace normd {

const char* LayerKindName(LayerKind kind) {
  switch (kind) {
    case LayerKind::kLinear: return "Linear";
    case LayerKind::kBatchNorm1d: return "BatchNorm1d";
    case LayerKind::kBatchNorm2d: return "BatchNorm2d";
    case LayerKind::kLayerNorm: return "LayerNorm";
    case LayerKind::kConv2d: return "Conv2d";
    case LayerKind::kMaxPool2d: return "MaxPool2d";
    case LayerKind::kAvgPool2d: return "AvgPool2d";
    case LayerKind::kFlatten: return "Flatten";
    case LayerKind::kReLU: return "ReLU";
    case LayerKind::kLeakyReLU: return "LeakyReLU";
    case LayerKind::kTanh: return "Tanh";
    case LayerKind::kSigmoid: return "Sigmoid";
    case LayerKind::kGELU: return "GELU";
    case LayerKind::kDropout: return "Dropout";
    case LayerKind::kGroupNorm: return "GroupNorm";
    case LayerKind::kInstanceNorm1d: return "InstanceNorm1d";
    case LayerKind::kInstanceNorm2d: return "InstanceNorm2d";
    case LayerKind::kResidual: return ResidualBlock::kKindName;
    case LayerKind::kAdaptiveAvgPool2d: return "AdaptiveAvgPool2d";
  }
  return "?";
}

bool IsNormLayerKind(LayerKind kind) {
  switch (kind) {
    case LayerKind::kBatchNorm1d:
    case LayerKind::kBatchNorm2d:
    case LayerKind::kLayerNorm:
    case LayerKind::kGroupNorm:
    case LayerKind::kInstanceNorm1d:
    case LayerKind::kInstanceNorm2d:
      return true;
    default:
      return false;
  }
}

std::vector<StateSlot> Layer::state() {
  std::vector<StateSlot> slots;
  for (Parameter* p : parameters()) slots.push_back(StateSlot{p->name, &p->value, nullptr});
  return slots;
}

std::unique_ptr<Layer> MakeLayer(const LayerConfig& c) {
  switch (c.kind) {
    case LayerKind::kLinear: return std::make_unique<Linear>(c.linear);
    case LayerKind::kBatchNorm1d: return std::make_unique<BatchNorm>(c.batch_norm, false);
    case LayerKind::kBatchNorm2d: return std::make_unique<BatchNorm>(c.batch_norm, true);
    case LayerKind::kLayerNorm: return std::make_unique<LayerNorm>(c.layer_norm);
    case LayerKind::kConv2d: return std::make_unique<Conv2d>(c.conv2d);
    case LayerKind::kMaxPool2d: return std::make_unique<Pool2d>(c.pool, true);
    case LayerKind::kAvgPool2d: return std::make_unique<Pool2d>(c.pool, false);
    case LayerKind::kFlatten: return std::make_unique<Flatten>();
    case LayerKind::kDropout: return std::make_unique<Dropout>(c.dropout_p);
    case LayerKind::kGroupNorm: return std::make_unique<GroupNorm>(c.group_norm);
    case LayerKind::kInstanceNorm1d: return std::make_unique<InstanceNorm>(c.instance_norm, false);
    case LayerKind::kInstanceNorm2d: return std::make_unique<InstanceNorm>(c.instance_norm, true);
    case LayerKind::kResidual: return std::make_unique<ResidualBlock>();
    case LayerKind::kAdaptiveAvgPool2d: return std::make_unique<AdaptiveAvgPool2d>();
    case LayerKind::kReLU:
    case LayerKind::kLeakyReLU:
    case LayerKind::kTanh:
    case LayerKind::kSigmoid:
    case LayerKind::kGELU: return std::make_unique<Activation>(c.kind, c.negative_slope);
  }
  return nullptr;
}

void Layer::ForwardWithRelu(const ConstTensorView& /*x*/, Tensor* /*y*/, LayerCache* /*cache*/,
                            const ForwardContext& /*ctx*/) const {
  std::abort();  // REQUIRES: FusesRelu()
}

void Layer::BackwardWithRelu(const ConstTensorView& /*x*/, const Tensor& /*y*/,
                             const ConstTensorView& /*dy*/, const LayerCache& /*cache*/,
                             const ForwardContext& /*ctx*/, Tensor* /*dx*/) {
  std::abort();  // REQUIRES: FusesRelu()
}

void Layer::RecomputeOutput(const ConstTensorView& /*x*/, const LayerCache& /*cache*/,
                            Tensor* /*y*/) const {
  std::abort();  // REQUIRES: FusesRelu()
}

namespace {

// True when layers[j] runs fused with the ReLU that follows it (Layer::FusesRelu).
bool FusedWithNextRelu(const LayerList& layers, size_t j) {
  if (j + 1 >= layers.size() || !layers[j]->FusesRelu()) return false;
  const auto* act = dynamic_cast<const Activation*>(layers[j + 1].get());
  return act != nullptr && act->kind() == LayerKind::kReLU;
}

}  // namespace

void ForwardLayers(const LayerList& layers, const ConstTensorView& x, const ForwardContext& ctx,
                   Tensor* outputs, LayerCache* caches) {
  for (size_t j = 0; j < layers.size(); ++j) {
    const ConstTensorView in = j == 0 ? x : outputs[j - 1].view();
    if (FusedWithNextRelu(layers, j)) {
      layers[j]->ForwardWithRelu(in, &outputs[j + 1], &caches[j], ctx);
      caches[j].relu_fused = true;
      if (outputs[j].size() != 0) outputs[j] = Tensor();  // a record reused from before
      ++j;
      continue;
    }
    caches[j].relu_fused = false;
    layers[j]->Forward(in, &outputs[j], &caches[j], ctx);
  }
}

void BackwardLayers(LayerList& layers, const ConstTensorView& x, const Tensor* outputs,
                    const LayerCache* caches, const ConstTensorView& dy,
                    const ForwardContext& ctx, Tensor* dx, Tensor* buf_a, Tensor* buf_b,
                    BackwardListener* listener) {
  const int n = static_cast<int>(layers.size());
  int stop = 0;
  if (dx == nullptr) {
    stop = n;
    for (int j = 0; j < n; ++j) {
      if (layers[j]->HasTrainableParameters()) {
        stop = j;
        break;
      }
    }
  }
  ConstTensorView grad = dy;
  Tensor* bufs[2] = {buf_a, buf_b};
  int next = 0;
  for (int j = n - 1; j >= stop; --j) {
    // A fused pair ends at the ReLU, j: both go back in one call. (The stop is a layer with
    // parameters, never the ReLU, so the fused layer is at or above it.)
    const bool fused = j >= 1 && caches[j - 1].relu_fused;
    assert(!fused || j - 1 >= stop);
    if (fused) {
      if (listener != nullptr) listener->LayerDone(j);
      --j;
    }
    const ConstTensorView in = j == 0 ? x : outputs[j - 1].view();
    Tensor* out = j == stop ? dx : bufs[next];
    if (fused) {
      layers[j]->BackwardWithRelu(in, outputs[j + 1], grad, caches[j], ctx, out);
    } else {
      layers[j]->Backward(in, outputs[j], grad, caches[j], ctx, out);
    }
    if (!layers[j]->trainable()) {
      // A layer may have accumulated anyway (Layer::trainable lets it skip, not must).
      for (Parameter* p : layers[j]->parameters()) p->grad.SetZero();
    }
    if (listener != nullptr) listener->LayerDone(j);
    if (j > stop) {
      grad = bufs[next]->view();
      next ^= 1;
    }
  }
}

}  // namespace normd
