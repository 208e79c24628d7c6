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

using StateMap = std::map<std::string, const NamedTensor*>;

// Folds the stack `src` whose state names start with src_prefix ("" at the top level,
// "4.body." in a block's body) into `dst` (layers), `map` and `state`, naming the folded
// layers' state with dst_prefix.
void FoldStack(const std::vector<LayerConfig>& src, const std::string& src_prefix,
               const std::string& dst_prefix, const StateMap& entries,
               const std::vector<NamedTensor>& all, std::vector<LayerConfig>* dst, FoldedStack* map,
               std::vector<NamedTensor>* state) {
  auto entry = [&](int layer, const char* name) -> const NamedTensor* {
    auto it = entries.find(StrCat(src_prefix, layer, ".", name));
    return it == entries.end() ? nullptr : it->second;
  };
  const int n = static_cast<int>(src.size());
  for (int i = 0; i < n; ++i) {
    const int j = static_cast<int>(dst->size());  // index in the folded stack
    LayerConfig layer = src[i];
    map->body.emplace_back();
    map->shortcut.emplace_back();
    map->source_layer.push_back(i);
    if (layer.kind == LayerKind::kResidual) {
      map->folded_batch_norm.push_back(-1);
      layer.residual = ResidualConfig();
      FoldStack(src[i].residual.body, StrCat(src_prefix, i, ".body."),
                StrCat(dst_prefix, j, ".body."), entries, all, &layer.residual.body,
                &map->body.back(), state);
      FoldStack(src[i].residual.shortcut, StrCat(src_prefix, i, ".shortcut."),
                StrCat(dst_prefix, j, ".shortcut."), entries, all, &layer.residual.shortcut,
                &map->shortcut.back(), state);
      dst->push_back(std::move(layer));
      continue;
    }
    const bool fold = i + 1 < n && Folds(layer, src[i + 1]);
    map->folded_batch_norm.push_back(fold ? i + 1 : -1);
    if (!fold) {
      const std::string prefix = StrCat(src_prefix, i, ".");
      for (const NamedTensor& e : all) {
        if (e.name.compare(0, prefix.size(), prefix) != 0) continue;
        NamedTensor copy = e;
        copy.name = StrCat(dst_prefix, j, ".", e.name.substr(prefix.size()));
        state->push_back(std::move(copy));
      }
      dst->push_back(std::move(layer));
      continue;
    }
    const BatchNormConfig& bn = src[i + 1].batch_norm;
    const NamedTensor* w = entry(i, "weight");
    const NamedTensor* b = entry(i, "bias");
    const NamedTensor* mean = entry(i + 1, "running_mean");
    const NamedTensor* var = entry(i + 1, "running_var");
    const NamedTensor* gamma = bn.affine ? entry(i + 1, "weight") : nullptr;
    const NamedTensor* beta = bn.affine ? entry(i + 1, "bias") : nullptr;
    assert(w != nullptr && mean != nullptr && var != nullptr);
    const int64_t channels = w->shape[0];
    const int64_t per_channel = channels > 0 ? w->shape.NumElements() / channels : 0;
    NamedTensor fw{StrCat(dst_prefix, j, ".weight"), w->shape,
                   std::vector<float>(w->values.size())};
    NamedTensor fb{StrCat(dst_prefix, j, ".bias"), Shape{channels}, std::vector<float>(channels)};
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
    state->push_back(std::move(fw));
    state->push_back(std::move(fb));
    if (layer.kind == LayerKind::kLinear) {
      layer.linear.bias = true;
    } else {
      layer.conv2d.bias = true;
    }
    dst->push_back(std::move(layer));
    ++i;  // the BatchNorm is consumed
  }
}

}  // namespace

int NumFoldedBatchNorms(const FoldedStack& stack) {
  int n = 0;
  for (size_t j = 0; j < stack.source_layer.size(); ++j) {
    n += stack.folded_batch_norm[j] >= 0;
    n += NumFoldedBatchNorms(stack.body[j]) + NumFoldedBatchNorms(stack.shortcut[j]);
  }
  return n;
}

void FoldBatchNorm(const Model& model, FoldedModel* out) {
  const ModelConfig& src = model.config();
  const std::vector<NamedTensor> entries = model.GetState(/*include_optimizer=*/false);
  StateMap state;
  for (const NamedTensor& e : entries) state[e.name] = &e;
  out->config = src;
  out->config.layers.clear();
  out->layers = FoldedStack();
  out->state.clear();
  FoldStack(src.layers, "", "", state, entries, &out->config.layers, &out->layers, &out->state);
}

}  // namespace normd
