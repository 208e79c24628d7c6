#include "core/clip_grad.h"

#include <cmath>

namespace normd {

double GradNorm(const std::vector<Parameter*>& params, const std::vector<bool>& include) {
  // Sixteen partial sums in double: the compiler may not reorder a floating-point sum by itself,
  // and independent lanes let it vectorise the squares and the adds (a chain of dependent adds
  // would cost far more than the squares).
  constexpr int kLanes = 16;
  double total = 0.0;
  for (size_t i = 0; i < params.size(); ++i) {
    if (!include[i]) continue;
    const float* g = params[i]->grad.data();
    const int64_t n = params[i]->grad.size();
    double acc[kLanes] = {};
    int64_t j = 0;
    for (; j + kLanes <= n; j += kLanes) {
      for (int l = 0; l < kLanes; ++l) acc[l] += double{g[j + l]} * g[j + l];
    }
    for (; j < n; ++j) acc[0] += double{g[j]} * g[j];
    for (int w = kLanes / 2; w > 0; w /= 2) {
      for (int l = 0; l < w; ++l) acc[l] += acc[l + w];
    }
    total += acc[0];
  }
  return std::sqrt(total);
}

void ClipGradsToNorm(const std::vector<Parameter*>& params, const std::vector<bool>& include,
                     double max_norm, double total_norm) {
  const float denom = static_cast<float>(total_norm) + 1e-6f;
  const float coef = static_cast<float>(max_norm) * (1.0f / denom);
  if (!(coef < 1.0f)) return;
  for (size_t i = 0; i < params.size(); ++i) {
    if (!include[i]) continue;
    float* g = params[i]->grad.data();
    const int64_t n = params[i]->grad.size();
    for (int64_t j = 0; j < n; ++j) g[j] *= coef;
  }
}

double ClipGradNorm(const std::vector<Parameter*>& params, const std::vector<bool>& include,
                    double max_norm) {
  const double total = GradNorm(params, include);
  ClipGradsToNorm(params, include, max_norm, total);
  return total;
}

}  // namespace normd
