// Losses, separate from layers, all with mean reduction as PyTorch's defaults:
//  - cross-entropy from logits (N, K) with integer class labels in [0, K)
//    (nn.CrossEntropyLoss: log-softmax + NLL, averaged over N), optionally with label smoothing
//    eps (F.cross_entropy's label_smoothing): the target puts 1 - eps + eps/K on the label and
//    eps/K on every other class, so per sample
//      loss = (1 - eps) * (-log p[label]) + (eps / K) * sum_j (-log p[j])
//      dloss/dz[j] = p[j] - (1 - eps) * [j == label] - eps / K;
//  - MSE over all elements (nn.MSELoss);
//  - BCE-with-logits over all elements (nn.BCEWithLogitsLoss, the log-sum-exp stable form).
#ifndef NORMD_CORE_LOSS_H_
#define NORMD_CORE_LOSS_H_

#include <cstdint>

#include "core/config.h"
#include "core/status.h"
#include "core/tensor.h"

namespace normd {

const char* LossKindName(LossKind kind);

// What a loss compares the model's output with: labels for cross-entropy, a float tensor of
// the output's shape for MSE and BCE-with-logits. Non-owning.
struct Targets {
  const int64_t* labels = nullptr;
  int64_t num_labels = 0;
  ConstTensorView target;
};

// Checks that the model's per-sample output shape suits the loss (cross-entropy needs a
// vector of class scores). Called when a model is built.
Status ValidateLossForOutput(LossKind kind, const Shape& sample_out);

// Checks label_smoothing: in [0, 1), and 0 unless the loss is cross-entropy. Messages name the
// field "label_smoothing".
Status ValidateLabelSmoothing(LossKind kind, double label_smoothing);

// Checks targets against an output of shape batch_out: label count and range, target shape,
// finite target values. Messages name the field and the expected vs received values.
Status ValidateTargets(LossKind kind, const Shape& batch_out, const Targets& targets);

// Returns the mean loss of `output`; when grad is non-null, writes dL/d(output) (resized to
// output's shape). label_smoothing applies to cross-entropy. REQUIRES: ValidateTargets and
// ValidateLabelSmoothing succeeded.
// mean_rows > 0: the mean is over a batch of that many rows of which `output` is a part (a
// data-parallel shard, core/collective.h): the result is this part's sum divided by the whole
// batch's count, and the gradient is seeded accordingly, so the parts' results add up to the
// whole batch's loss and gradient. mean_rows = 0: over output's own rows (which may then not be
// 0).
double ComputeLoss(LossKind kind, const ConstTensorView& output, const Targets& targets,
                   Tensor* grad, double label_smoothing = 0.0, int64_t mean_rows = 0);

// Fraction of rows whose arg-max equals the label. REQUIRES: cross-entropy targets, validated.
double Accuracy(const ConstTensorView& output, const Targets& targets);
// How many rows' arg-max equals the label (0 for an empty output).
int64_t CorrectPredictions(const ConstTensorView& output, const Targets& targets);

}  // namespace normd

#endif  // NORMD_CORE_LOSS_H_
