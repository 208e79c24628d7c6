#include "core/fold.h"

#include <cassert>
#include <cmath>
#include <map>
#include <string>
#include <utility>

namespace normd {
namespace {

bool Folds(const LayerConfig& prev, const LayerConfig& bn) {
  if (!bn.batch_norm.track_running_stats) return false;
  return (prev.kind == LayerKind::kLinear && bn.kind == LayerKind::kBatchNorm1d) ||
         (prev.kind == LayerKind::kConv2d && bn.kind == LayerKind::kBatchNorm2d);
}

}  // namespace

void FoldBatchNorm(const Model& model, FoldedModel* out) {
  const ModelConfig& src = model.config();
  std::map<std::string, const NamedTensor*> state;
  const std::vector<NamedTensor> entries = model.GetState(/*include_optimizer=*/false);
  for (const NamedTensor& e : entries) state[e.name] = &e;
  auto entry = [&](int layer, const char* name) -> const NamedTensor* {
    auto it = state.find(StrCat(layer, ".", name));
    return it == state.end() ? nullptr : it->second;
  };

  out->config = src;
  out->config.layers.clear();
  out->source_layer.clear();
  out->folded_batch_norm.clear();
  out->state.clear();
  const int n = static_cast<int>(src.layers.size());
  for (int i = 0; i < n; ++i) {
    const int j = static_cast<int>(out->config.layers.size());  // index in the folded model
    LayerConfig layer = src.layers[i];
    const bool fold = i + 1 < n && Folds(layer, src.layers[i + 1]);
    out->source_layer.push_back(i);
    out->folded_batch_norm.push_back(fold ? i + 1 : -1);
    if (!fold) {
      for (const NamedTensor& e : entries) {
        const std::string prefix = StrCat(i, ".");
        if (e.name.compare(0, prefix.size(), prefix) != 0) continue;
        NamedTensor copy = e;
        copy.name = StrCat(j, ".", e.name.substr(prefix.size()));
        out->state.push_back(std::move(copy));
      }
      out->config.layers.push_back(std::move(layer));
      continue;
    }
    const BatchNormConfig& bn = src.layers[i + 1].batch_norm;
    const NamedTensor* w = entry(i, "weight");
    const NamedTensor* b = entry(i, "bias");
    const NamedTensor* mean = entry(i + 1, "running_mean");
    const NamedTensor* var = entry(i + 1, "running_var");
    const NamedTensor* gamma = bn.affine ? entry(i + 1, "weight") : nullptr;
    const NamedTensor* beta = bn.affine ? entry(i + 1, "bias") : nullptr;
    assert(w != nullptr && mean != nullptr && var != nullptr);
    const int64_t channels = w->shape[0];
    const int64_t per_channel = channels > 0 ? w->shape.NumElements() / channels : 0;
    NamedTensor fw{StrCat(j, ".weight"), w->shape, std::vector<float>(w->values.size())};
    NamedTensor fb{StrCat(j, ".bias"), Shape{channels}, std::vector<float>(channels)};
    for (int64_t o = 0; o < channels; ++o) {
      const double g = gamma != nullptr ? gamma->values[o] : 1.0;
      const double be = beta != nullptr ? beta->values[o] : 0.0;
      const double s = g / std::sqrt(double{var->values[o]} + double{bn.eps});
      for (int64_t k = 0; k < per_channel; ++k) {
        const int64_t at = o * per_channel + k;
        fw.values[at] = static_cast<float>(w->values[at] * s);
      }
      const double bias = b != nullptr ? b->values[o] : 0.0;
      fb.values[o] = static_cast<float>((bias - mean->values[o]) * s + be);
    }
    out->state.push_back(std::move(fw));
    out->state.push_back(std::move(fb));
    if (layer.kind == LayerKind::kLinear) {
      layer.linear.bias = true;
    } else {
      layer.conv2d.bias = true;
    }
    out->config.layers.push_back(std::move(layer));
    ++i;  // the BatchNorm is consumed
  }
}

}  // namespace normd
