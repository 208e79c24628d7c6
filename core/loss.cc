#include "core/loss.h"

#include <algorithm>
#include <cmath>

namespace normd {

const char* LossKindName(LossKind kind) {
  switch (kind) {
    case LossKind::kCrossEntropy: return "cross-entropy";
    case LossKind::kMse: return "MSE";
    case LossKind::kBceWithLogits: return "BCE-with-logits";
  }
  return "?";
}

Status ValidateLossForOutput(LossKind kind, const Shape& sample_out) {
  if (kind == LossKind::kCrossEntropy && sample_out.rank() != 1) {
    return InvalidArgument("cross-entropy needs the model to output a vector of class scores, "
                           "but its per-sample output is ",
                           sample_out.ToString());
  }
  return Status::Ok();
}

Status ValidateLabelSmoothing(LossKind kind, double label_smoothing) {
  if (!(std::isfinite(label_smoothing) && label_smoothing >= 0.0 && label_smoothing < 1.0)) {
    return InvalidArgument("label_smoothing must be in [0, 1), got ", label_smoothing);
  }
  if (label_smoothing != 0.0 && kind != LossKind::kCrossEntropy) {
    return InvalidArgument("label_smoothing applies to cross-entropy only, not to ",
                           LossKindName(kind));
  }
  return Status::Ok();
}

Status ValidateTargets(LossKind kind, const Shape& batch_out, const Targets& t) {
  const int64_t n = batch_out[0];
  if (kind == LossKind::kCrossEntropy) {
    if (t.target.data != nullptr && t.target.size() > 0) {
      return InvalidArgument("target: cross-entropy takes integer labels, not a target tensor");
    }
    if (t.num_labels != n) {
      return InvalidArgument("labels has ", t.num_labels, " entries but the batch has ", n,
                             " samples");
    }
    const int64_t k = batch_out[1];
    for (int64_t i = 0; i < n; ++i) {
      if (t.labels[i] < 0 || t.labels[i] >= k) {
        return InvalidArgument("labels[", i, "] = ", t.labels[i], " is out of range [0, ", k, ")");
      }
    }
    return Status::Ok();
  }
  if (t.num_labels != 0) {
    return InvalidArgument("labels: ", LossKindName(kind),
                           " takes a target tensor, not integer labels");
  }
  if (t.target.data == nullptr) {
    return InvalidArgument("target is missing: ", LossKindName(kind),
                           " needs a target tensor of the output's shape ", batch_out.ToString());
  }
  if (t.target.shape != batch_out) {
    return InvalidArgument("target has shape ", t.target.shape.ToString(),
                           " but the model's output has shape ", batch_out.ToString());
  }
  if (!AllFinite(t.target.data, t.target.size())) {
    return InvalidArgument("target contains non-finite values (NaN or Inf)");
  }
  return Status::Ok();
}

double ComputeLoss(LossKind kind, const ConstTensorView& out, const Targets& t, Tensor* grad,
                   double label_smoothing, int64_t mean_rows) {
  const int64_t n = out.rows();
  const int64_t size = out.size();
  const int64_t rows = mean_rows > 0 ? mean_rows : n;
  const int64_t mean_size = rows * out.shape.DropFirst().NumElements();
  if (grad != nullptr) grad->Resize(out.shape);
  double total = 0.0;
  switch (kind) {
    case LossKind::kCrossEntropy: {
      const int64_t k = out.cols();
      const double inv_n = 1.0 / static_cast<double>(rows);
      const double eps = label_smoothing;
      const double on_label = 1.0 - eps;             // the label's weight beyond eps / K
      const double uniform = eps / static_cast<double>(k);
      for (int64_t i = 0; i < n; ++i) {
        const float* row = out.data + i * k;
        const float mx = *std::max_element(row, row + k);
        double sum = 0.0;
        for (int64_t j = 0; j < k; ++j) sum += std::exp(double{row[j]} - mx);
        const double lse = mx + std::log(sum);
        double nll = lse - row[t.labels[i]];
        if (eps != 0.0) {
          double smooth = 0.0;  // sum_j -log p[j]
          for (int64_t j = 0; j < k; ++j) smooth += lse - row[j];
          nll = on_label * nll + uniform * smooth;
        }
        total += nll;
        if (grad != nullptr) {
          float* g = grad->data() + i * k;
          for (int64_t j = 0; j < k; ++j) {
            const double p = std::exp(double{row[j]} - lse);
            const double target = (j == t.labels[i] ? on_label : 0.0) + uniform;
            g[j] = static_cast<float>((p - target) * inv_n);
          }
        }
      }
      return total * inv_n;
    }
    case LossKind::kMse: {
      const double inv = 1.0 / static_cast<double>(mean_size);
      for (int64_t i = 0; i < size; ++i) {
        const double d = double{out.data[i]} - t.target.data[i];
        total += d * d;
        if (grad != nullptr) grad->data()[i] = static_cast<float>(2.0 * d * inv);
      }
      return total * inv;
    }
    case LossKind::kBceWithLogits: {
      const double inv = 1.0 / static_cast<double>(mean_size);
      for (int64_t i = 0; i < size; ++i) {
        const double x = out.data[i];
        const double y = t.target.data[i];
        total += std::max(x, 0.0) - x * y + std::log1p(std::exp(-std::abs(x)));
        if (grad != nullptr) {
          const double s = 1.0 / (1.0 + std::exp(-x));
          grad->data()[i] = static_cast<float>((s - y) * inv);
        }
      }
      return total * inv;
    }
  }
  return total;
}

int64_t CorrectPredictions(const ConstTensorView& out, const Targets& t) {
  const int64_t n = out.rows();
  const int64_t k = out.cols();
  int64_t correct = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float* row = out.data + i * k;
    if (std::max_element(row, row + k) - row == t.labels[i]) ++correct;
  }
  return correct;
}

double Accuracy(const ConstTensorView& out, const Targets& t) {
  const int64_t n = out.rows();
  if (n == 0) return 0.0;
  return static_cast<double>(CorrectPredictions(out, t)) / static_cast<double>(n);
}

}  // namespace normd
