// Gradient-norm clipping, torch.nn.utils.clip_grad_norm_ with norm type 2.
#ifndef NORMD_CORE_CLIP_GRAD_H_
#define NORMD_CORE_CLIP_GRAD_H_

#include <vector>

#include "core/layer.h"

namespace normd {

// The 2-norm of the gradients of the parameters i with include[i], taken together as one
// vector, accumulated in double. REQUIRES: include.size() == params.size().
double GradNorm(const std::vector<Parameter*>& params, const std::vector<bool>& include);

// Scales the gradients of those parameters by min(1, max_norm / (total_norm + 1e-6)) and
// returns total_norm (GradNorm, before clipping). As torch does, the coefficient is computed in
// float32 from the float32 total norm, max_norm * (1 / (total_norm + 1e-6)); unlike torch,
// gradients are left untouched, rather than multiplied by 1, when it is not below 1.
// REQUIRES: max_norm > 0 and finite, the gradients finite.
double ClipGradNorm(const std::vector<Parameter*>& params, const std::vector<bool>& include,
                    double max_norm);
// ClipGradNorm with the total norm already known. REQUIRES: total_norm is GradNorm(params,
// include) of the gradients as they are.
void ClipGradsToNorm(const std::vector<Parameter*>& params, const std::vector<bool>& include,
                     double max_norm, double total_norm);

}  // namespace normd

#endif  // NORMD_CORE_CLIP_GRAD_H_
