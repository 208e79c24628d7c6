// LayerConfig builders for the core tests of layer trees (residual_test, sequential_test):
// one line a layer, so a test's architecture reads as the model it builds (tests only).
#ifndef NORMD_TESTS_CORE_LAYER_CONFIGS_H_
#define NORMD_TESTS_CORE_LAYER_CONFIGS_H_

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "core/config.h"

namespace normd {
namespace testing {

// Conv2d without bias (a BatchNorm follows it in these tests).
inline LayerConfig Conv(int64_t cin, int64_t cout, int64_t k, int64_t stride = 1,
                        int64_t pad = 0, int64_t groups = 1) {
  LayerConfig l;
  l.kind = LayerKind::kConv2d;
  l.conv2d.in_channels = cin;
  l.conv2d.out_channels = cout;
  l.conv2d.kernel_size = k;
  l.conv2d.stride = stride;
  l.conv2d.padding = pad;
  l.conv2d.bias = false;
  l.conv2d.groups = groups;
  return l;
}

// BatchNorm2d with PyTorch's defaults; `name` is the layer's label (empty: its path).
inline LayerConfig Bn2d(int64_t c, const std::string& name = "") {
  LayerConfig l;
  l.kind = LayerKind::kBatchNorm2d;
  l.batch_norm.num_features = c;
  l.name = name;
  return l;
}

// A layer of `kind` with no options (activations, Flatten, AdaptiveAvgPool2d).
inline LayerConfig Simple(LayerKind kind) {
  LayerConfig l;
  l.kind = kind;
  return l;
}

inline LayerConfig Linear(int64_t in, int64_t out) {
  LayerConfig l;
  l.kind = LayerKind::kLinear;
  l.linear.in_features = in;
  l.linear.out_features = out;
  return l;
}

inline LayerConfig Dropout(float p) {
  LayerConfig l = Simple(LayerKind::kDropout);
  l.dropout_p = p;
  return l;
}

// A residual block; an empty shortcut is the identity.
inline LayerConfig Residual(std::vector<LayerConfig> body,
                            std::vector<LayerConfig> shortcut = {}) {
  LayerConfig l;
  l.kind = LayerKind::kResidual;
  l.residual.body = std::move(body);
  l.residual.shortcut = std::move(shortcut);
  return l;
}

}  // namespace testing
}  // namespace normd

#endif  // NORMD_TESTS_CORE_LAYER_CONFIGS_H_
