// BatchNorm folding: an inference copy of a model in which every BatchNorm that directly follows
// a Linear (BatchNorm1d) or a Conv2d (BatchNorm2d) is merged into that layer's weight and bias,
// as torch.nn.utils.fuse_linear_bn_eval / fuse_conv_bn_eval do. With s = gamma / sqrt(var + eps)
// per output feature or channel o, from the BatchNorm's running statistics:
//   W'[o, ...] = W[o, ...] * s[o]
//   b'[o]      = (b[o] - running_mean[o]) * s[o] + beta[o]
// (affine=false: gamma = 1, beta = 0; a layer without bias gains one, b = 0). Computed in double
// and rounded once. The folded model's eval-mode output equals the original's eval-mode output
// up to float rounding.
//
// A BatchNorm without running statistics (track_running_stats=false) normalises with batch
// statistics in eval mode too, so it cannot fold: it stays in the copy as it is, like every
// BatchNorm that does not directly follow a Linear or Conv2d. The copy's other layers and their
// state (running statistics of the BatchNorms left in place included) are copied unchanged; it
// carries no optimizer state.
//
// Residual blocks stay blocks; their branches fold the same way (a Conv2d followed by a
// BatchNorm2d in a body or a projection shortcut merges), and the layers after a folded pair
// move up, so their paths in the copy change ("4.body.3" may become "4.body.2").
#ifndef NORMD_CORE_FOLD_H_
#define NORMD_CORE_FOLD_H_

#include <vector>

#include "core/config.h"
#include "core/model.h"

namespace normd {

// How one stack of the folded model (its top level, or a residual block's branch) maps to the
// source's.
struct FoldedStack {
  // Per layer of the folded stack: the index of the source layer it comes from, and the index
  // of the source BatchNorm folded into it (-1: none), both in the source's same stack.
  std::vector<int> source_layer;
  std::vector<int> folded_batch_norm;
  // Per layer of the folded stack: a residual block's folded branches (empty for other layers).
  std::vector<FoldedStack> body;
  std::vector<FoldedStack> shortcut;
};

struct FoldedModel {
  // The folded architecture: the source's input shape, loss, optimizer and seed; its layers
  // without the folded BatchNorms; a folded Linear/Conv2d has bias = true.
  ModelConfig config;
  FoldedStack layers;  // the top level, and through it every branch
  // The folded model's state_dict (names of its own layer paths), strict-complete.
  std::vector<NamedTensor> state;
};

// The number of BatchNorm layers folded into `stack`'s layers and its branches'.
int NumFoldedBatchNorms(const FoldedStack& stack);

// Folds `model` (its parameters and running statistics as they are now; its mode does not
// matter). Shared access to the model suffices.
void FoldBatchNorm(const Model& model, FoldedModel* out);

}  // namespace normd

#endif  // NORMD_CORE_FOLD_H_
