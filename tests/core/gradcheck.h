// Finite-difference gradient checks for layers and losses (tests only).
//
// A layer is checked through the scalar L = sum(y * r), r a fixed random projection: the
// layer's Backward with dy = r must give dL/dx and dL/dparam, which are compared with central
// differences (L(v + eps) - L(v - eps)) / (2 eps) of every checked element v, L accumulated in
// double over the float outputs. The check also enforces the Backward contract of
// core/layer.h: dx is overwritten (it is pre-filled with garbage), parameter gradients are
// accumulated (they are pre-filled with a random pattern that must survive underneath), and
// the parameter gradients do not depend on whether dx was requested.
//
// Forward is re-run with the same ForwardContext for every difference; when ctx.rng is set its
// state is restored before each forward, so Dropout draws the same mask every time. A
// training-mode BatchNorm leaves its running-statistics update pending in the cache and never
// commits it, so buffers do not move during the check.
//
// Inputs must keep clear of kinks (ReLU at 0, ties in a MaxPool window) by more than eps.
#ifndef NORMD_TESTS_CORE_GRADCHECK_H_
#define NORMD_TESTS_CORE_GRADCHECK_H_

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "core/layer.h"
#include "core/loss.h"
#include "core/tensor.h"

namespace normd {
namespace testing {

struct GradCheckOptions {
  float eps = 1e-2f;  // finite-difference step
  // Element i passes when |analytic - numeric| <= atol + rtol * |numeric|.
  double rtol = 1e-2;
  double atol = 1e-3;
  // And the tensor as a whole passes when ||analytic - numeric|| / ||numeric|| <= this. Float32
  // layers measure around 1e-5 here; a wrong factor anywhere in a gradient shows far above.
  double max_rel_error = 1e-3;
  // Elements checked per tensor: all of them when the tensor is smaller, else a random subset.
  int64_t max_checks_per_tensor = 200;
  uint64_t seed = 20240601;  // the projection r and the element subset
};

struct TensorCheck {
  std::string name;  // "input", or the parameter's name
  int64_t checked = 0;
  int64_t failures = 0;
  double max_abs_error = 0.0;
  // ||analytic - numeric|| / ||numeric|| over the checked elements (0 when both vanish).
  double rel_error = 0.0;
  std::string first_failure;  // "element 12: analytic 0.5 numeric 0.47"
};

struct GradCheckReport {
  std::vector<TensorCheck> tensors;
  // Violations of the layer contract (dx accumulated, grads overwritten, ...).
  std::vector<std::string> contract_errors;

  bool ok() const;
  // Largest rel_error over the tensors.
  double max_rel_error() const;
  std::string ToString() const;
};

// Compares analytic[i] with the central difference of f() in x[i], for the n values at x.
// f reads x; x is restored after each difference.
TensorCheck CompareWithFiniteDifferences(const std::string& name, float* x, int64_t n,
                                         const float* analytic,
                                         const std::function<double()>& f,
                                         const GradCheckOptions& opts);

// Checks dL/dx and every parameter gradient of `layer`. REQUIRES: layer built for x's
// per-sample shape and allocated; ctx valid for it (rng set when training uses Dropout).
// Parameter values and grads are left as they were found.
GradCheckReport CheckLayerGradients(Layer* layer, const Tensor& x, const ForwardContext& ctx,
                                    const GradCheckOptions& opts = {});

// Checks the gradient ComputeLoss writes against central differences of the loss it returns.
// REQUIRES: ValidateTargets(kind, output.shape(), targets) is OK.
GradCheckReport CheckLossGradient(LossKind kind, const Tensor& output, const Targets& targets,
                                  const GradCheckOptions& opts = {},
                                  double label_smoothing = 0.0);

// Builds `layer` for the per-sample shape and allocates it from a generator seeded with seed.
Status BuildAndAllocate(Layer* layer, const Shape& sample_in, uint64_t seed,
                        Shape* sample_out = nullptr);

// Asserts (gtest EXPECT) that report is ok and prints one "GRADCHECK <label> <tensor>
// rel_error=..." line per tensor, so a test log shows the errors measured.
void ExpectGradientsMatch(const GradCheckReport& report, const std::string& label);

// A tensor of the given shape with values uniform in [lo, hi).
Tensor RandomTensor(const Shape& shape, uint64_t seed, float lo = -1.0f, float hi = 1.0f);

// A tensor whose values are distinct and at least `gap` apart (a shuffled arithmetic
// sequence centred on 0), so no max is tied and no ReLU input sits within gap/2 of zero.
Tensor SpacedTensor(const Shape& shape, uint64_t seed, float gap = 0.05f);

}  // namespace testing
}  // namespace normd

#endif  // NORMD_TESTS_CORE_GRADCHECK_H_
