#include "core/clip_grad.h"

#include <cmath>

namespace normd {

double GradNorm(const std::vector<Parameter*>& params, const std::vector<bool>& include) {
  double total = 0.0;
  for (size_t i = 0; i < params.size(); ++i) {
    if (!include[i]) continue;
    const float* g = params[i]->grad.data();
    const int64_t n = params[i]->grad.size();
    // Four partial sums: the compiler may not reorder a floating-point sum by itself, and one
    // chain of dependent adds would cost far more than the squares.
    double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) {
      const double a = g[j], b = g[j + 1], c = g[j + 2], d = g[j + 3];
      s0 += a * a;
      s1 += b * b;
      s2 += c * c;
      s3 += d * d;
    }
    for (; j < n; ++j) s0 += double{g[j]} * g[j];
    total += (s0 + s1) + (s2 + s3);
  }
  return std::sqrt(total);
}

double ClipGradNorm(const std::vector<Parameter*>& params, const std::vector<bool>& include,
                    double max_norm) {
  const double total = GradNorm(params, include);
  const float denom = static_cast<float>(total) + 1e-6f;
  const float coef = static_cast<float>(max_norm) * (1.0f / denom);
  if (!(coef < 1.0f)) return total;
  for (size_t i = 0; i < params.size(); ++i) {
    if (!include[i]) continue;
    float* g = params[i]->grad.data();
    const int64_t n = params[i]->grad.size();
    for (int64_t j = 0; j < n; ++j) g[j] *= coef;
  }
  return total;
}

}  // namespace normd
