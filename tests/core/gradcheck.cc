#include "tests/core/gradcheck.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <sstream>
#include <utility>

#include "core/rng.h"
#include "gtest/gtest.h"

namespace normd {
namespace testing {
namespace {

// Up to `limit` distinct indices in [0, n), ascending; all of them when n <= limit.
std::vector<int64_t> SampleIndices(int64_t n, int64_t limit, Rng& rng) {
  std::vector<int64_t> all(n);
  std::iota(all.begin(), all.end(), 0);
  if (n <= limit) return all;
  for (int64_t i = 0; i < limit; ++i) {  // partial Fisher-Yates
    const int64_t j = i + static_cast<int64_t>(rng.Next() % static_cast<uint64_t>(n - i));
    std::swap(all[i], all[j]);
  }
  all.resize(limit);
  std::sort(all.begin(), all.end());
  return all;
}

double Dot(const Tensor& y, const Tensor& r) {
  double s = 0.0;
  for (int64_t i = 0; i < y.size(); ++i) s += double{y.data()[i]} * r.data()[i];
  return s;
}

}  // namespace

bool GradCheckReport::ok() const {
  if (!contract_errors.empty()) return false;
  for (const TensorCheck& t : tensors) {
    if (t.failures > 0) return false;
  }
  return true;
}

double GradCheckReport::max_rel_error() const {
  double m = 0.0;
  for (const TensorCheck& t : tensors) m = std::max(m, t.rel_error);
  return m;
}

std::string GradCheckReport::ToString() const {
  std::ostringstream os;
  for (const TensorCheck& t : tensors) {
    os << t.name << ": " << t.checked << " checked, rel error " << t.rel_error
       << ", max abs error " << t.max_abs_error << ", " << t.failures << " failures";
    if (!t.first_failure.empty()) os << " (first: " << t.first_failure << ")";
    os << "\n";
  }
  for (const std::string& e : contract_errors) os << "contract: " << e << "\n";
  return os.str();
}

TensorCheck CompareWithFiniteDifferences(const std::string& name, float* x, int64_t n,
                                         const float* analytic,
                                         const std::function<double()>& f,
                                         const GradCheckOptions& opts) {
  TensorCheck check;
  check.name = name;
  Rng rng(opts.seed ^ std::hash<std::string>()(name));
  double diff2 = 0.0, ref2 = 0.0;
  for (int64_t i : SampleIndices(n, opts.max_checks_per_tensor, rng)) {
    const float saved = x[i];
    x[i] = saved + opts.eps;
    const double plus = f();
    x[i] = saved - opts.eps;
    const double minus = f();
    x[i] = saved;
    // The step actually taken, after float rounding of saved +- eps.
    const double step = (double{saved + opts.eps} - double{saved - opts.eps});
    const double numeric = (plus - minus) / step;
    const double a = analytic[i];
    const double err = std::abs(a - numeric);
    ++check.checked;
    diff2 += err * err;
    ref2 += numeric * numeric;
    check.max_abs_error = std::max(check.max_abs_error, err);
    if (!(err <= opts.atol + opts.rtol * std::abs(numeric))) {
      if (check.failures == 0) {
        std::ostringstream os;
        os << "element " << i << ": analytic " << a << " numeric " << numeric;
        check.first_failure = os.str();
      }
      ++check.failures;
    }
  }
  if (ref2 > 0.0) {
    check.rel_error = std::sqrt(diff2 / ref2);
  } else if (diff2 > 0.0) {
    check.rel_error = std::sqrt(diff2);  // numeric gradient vanishes: report the absolute
  }
  if (!(check.rel_error <= opts.max_rel_error)) {
    ++check.failures;
    std::ostringstream os;
    os << "relative error " << check.rel_error << " over the tensor exceeds "
       << opts.max_rel_error;
    if (!check.first_failure.empty()) os << "; " << check.first_failure;
    check.first_failure = os.str();
  }
  return check;
}

GradCheckReport CheckLayerGradients(Layer* layer, const Tensor& x, const ForwardContext& ctx,
                                    const GradCheckOptions& opts) {
  GradCheckReport report;
  Rng* const rng = ctx.rng;
  const std::array<uint64_t, 4> rng_start = rng != nullptr ? rng->state() : std::array<uint64_t, 4>{};

  Tensor xp = x;  // perturbed copy
  Tensor y;
  LayerCache cache;
  auto forward = [&]() {
    if (rng != nullptr) rng->set_state(rng_start);
    layer->Forward(xp.view(), &y, &cache, ctx);
  };

  // The projection r, drawn once the output shape is known.
  forward();
  const Tensor y0 = y;
  Tensor r = RandomTensor(y.shape(), opts.seed);
  auto loss = [&]() {
    forward();
    return Dot(y, r);
  };

  // Analytic gradients on top of a random pre-fill, which Backward must add to.
  std::vector<Parameter*> params = layer->parameters();
  std::vector<Tensor> saved_grads, prefill;
  for (size_t p = 0; p < params.size(); ++p) {
    saved_grads.push_back(params[p]->grad);
    prefill.push_back(RandomTensor(params[p]->grad.shape(), opts.seed + 1 + p));
    params[p]->grad = prefill.back();
  }
  Tensor dx(x.shape(), 7.25f);  // garbage Backward must overwrite
  forward();
  const LayerCache cache0 = cache;
  layer->Backward(xp.view(), y, r.view(), cache0, ctx, &dx);
  if (dx.shape() != x.shape()) {
    report.contract_errors.push_back("dx has shape " + dx.shape().ToString() + ", x has " +
                                     x.shape().ToString());
    return report;
  }
  std::vector<Tensor> grads;
  for (size_t p = 0; p < params.size(); ++p) {
    Tensor g = params[p]->grad;
    for (int64_t i = 0; i < g.size(); ++i) g.data()[i] -= prefill[p].data()[i];
    grads.push_back(std::move(g));
  }

  // A second Backward without dx must add exactly the same parameter gradients again.
  layer->Backward(xp.view(), y, r.view(), cache0, ctx, nullptr);
  for (size_t p = 0; p < params.size(); ++p) {
    const Tensor& now = params[p]->grad;
    double worst = 0.0, scale = 1e-6;
    for (int64_t i = 0; i < now.size(); ++i) {
      const double expected = double{prefill[p].data()[i]} + 2.0 * grads[p].data()[i];
      worst = std::max(worst, std::abs(now.data()[i] - expected));
      scale = std::max(scale, std::abs(double{grads[p].data()[i]}));
    }
    if (worst > 1e-5 * std::max(1.0, scale)) {
      std::ostringstream os;
      os << params[p]->name << ": a second Backward (dx == nullptr) did not add the same "
         << "gradient again (off by " << worst << ")";
      report.contract_errors.push_back(os.str());
    }
    params[p]->grad = saved_grads[p];
  }

  // Forward must be repeatable (same rng state, same input: same output).
  forward();
  if (y.shape() != y0.shape() ||
      !std::equal(y0.data(), y0.data() + y0.size(), y.data())) {
    report.contract_errors.push_back("two forwards of the same input differ");
  }

  report.tensors.push_back(
      CompareWithFiniteDifferences("input", xp.data(), xp.size(), dx.data(), loss, opts));
  for (size_t p = 0; p < params.size(); ++p) {
    Tensor& v = params[p]->value;
    report.tensors.push_back(CompareWithFiniteDifferences(params[p]->name, v.data(), v.size(),
                                                          grads[p].data(), loss, opts));
  }
  if (rng != nullptr) rng->set_state(rng_start);
  return report;
}

GradCheckReport CheckLossGradient(LossKind kind, const Tensor& output, const Targets& targets,
                                  const GradCheckOptions& opts, double label_smoothing) {
  GradCheckReport report;
  Tensor out = output;
  Tensor grad(output.shape(), 7.25f);
  ComputeLoss(kind, out.view(), targets, &grad, label_smoothing);
  if (grad.shape() != output.shape()) {
    report.contract_errors.push_back("grad has shape " + grad.shape().ToString() +
                                     ", output has " + output.shape().ToString());
    return report;
  }
  auto loss = [&]() { return ComputeLoss(kind, out.view(), targets, nullptr, label_smoothing); };
  report.tensors.push_back(CompareWithFiniteDifferences(LossKindName(kind), out.data(),
                                                        out.size(), grad.data(), loss, opts));
  return report;
}

Status BuildAndAllocate(Layer* layer, const Shape& sample_in, uint64_t seed,
                        Shape* sample_out) {
  Shape out;
  NORMD_RETURN_IF_ERROR(layer->Build(sample_in, &out));
  Rng rng(seed);
  layer->Allocate(rng);
  if (sample_out != nullptr) *sample_out = out;
  return Status::Ok();
}

void ExpectGradientsMatch(const GradCheckReport& report, const std::string& label) {
  EXPECT_TRUE(report.ok()) << label << "\n" << report.ToString();
  EXPECT_FALSE(report.tensors.empty()) << label;
  for (const TensorCheck& t : report.tensors) {
    EXPECT_GT(t.checked, 0) << label << " " << t.name;
    std::printf("GRADCHECK %s %s rel_error=%.3g max_abs_error=%.3g checked=%lld\n",
                label.c_str(), t.name.c_str(), t.rel_error, t.max_abs_error,
                static_cast<long long>(t.checked));
  }
}

Tensor RandomTensor(const Shape& shape, uint64_t seed, float lo, float hi) {
  Tensor t(shape);
  Rng rng(seed);
  for (int64_t i = 0; i < t.size(); ++i) t.data()[i] = rng.Uniform(lo, hi);
  return t;
}

Tensor SpacedTensor(const Shape& shape, uint64_t seed, float gap) {
  Tensor t(shape);
  const int64_t n = t.size();
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  Rng rng(seed);
  for (int64_t i = n - 1; i > 0; --i) {
    std::swap(order[i], order[rng.Next() % static_cast<uint64_t>(i + 1)]);
  }
  // Values gap * (k - (n - 1) / 2 + 1/4): symmetric spread, none closer than gap/4 to zero.
  for (int64_t k = 0; k < n; ++k) {
    t.data()[order[k]] = gap * (static_cast<float>(k) - 0.5f * static_cast<float>(n - 1) + 0.25f);
  }
  return t;
}

}  // namespace testing
}  // namespace normd
