#include "core/activation.h"

#include <algorithm>
#include <cmath>
#include <ostream>
#include <string>

#include "gtest/gtest.h"
#include "tests/core/gradcheck.h"

namespace normd {
namespace {

using testing::BuildAndAllocate;
using testing::CheckLayerGradients;
using testing::ExpectGradientsMatch;
using testing::RandomTensor;
using testing::SpacedTensor;

// Runs layer on the given values (shape (1, n)) and returns the outputs.
std::vector<float> Apply(Layer* layer, const std::vector<float>& in,
                         const ForwardContext& ctx = {}) {
  const int64_t n = static_cast<int64_t>(in.size());
  Shape out;
  EXPECT_TRUE(layer->Build(Shape{n}, &out).ok());
  Tensor y;
  LayerCache cache;
  layer->Forward(ConstTensorView{in.data(), Shape{1, n}}, &y, &cache, ctx);
  return std::vector<float>(y.data(), y.data() + y.size());
}

TEST(ActivationTest, ForwardValues) {
  const std::vector<float> in = {-2.0f, -0.5f, 0.0f, 0.5f, 1.0f, 3.0f};
  {
    Activation relu(LayerKind::kReLU, 0.0f);
    EXPECT_EQ(Apply(&relu, in), (std::vector<float>{0, 0, 0, 0.5f, 1, 3}));
  }
  {
    Activation leaky(LayerKind::kLeakyReLU, 0.01f);
    const std::vector<float> y = Apply(&leaky, in);
    EXPECT_FLOAT_EQ(y[0], -0.02f);
    EXPECT_FLOAT_EQ(y[1], -0.005f);
    EXPECT_FLOAT_EQ(y[2], 0.0f);
    EXPECT_FLOAT_EQ(y[5], 3.0f);
  }
  {
    Activation tanh(LayerKind::kTanh, 0.0f);
    const std::vector<float> y = Apply(&tanh, in);
    for (size_t i = 0; i < in.size(); ++i) EXPECT_NEAR(y[i], std::tanh(in[i]), 2e-7f) << i;
  }
  {
    Activation sigmoid(LayerKind::kSigmoid, 0.0f);
    const std::vector<float> y = Apply(&sigmoid, in);
    EXPECT_FLOAT_EQ(y[2], 0.5f);
    EXPECT_NEAR(y[4], 0.7310585786f, 1e-7f);
    EXPECT_NEAR(y[0], 0.1192029220f, 1e-7f);
  }
  {
    Activation gelu(LayerKind::kGELU, 0.0f);
    const std::vector<float> y = Apply(&gelu, in);
    EXPECT_NEAR(y[4], 0.8413447461f, 1e-6f);   // 1 * Phi(1)
    EXPECT_NEAR(y[0], -0.0455002639f, 1e-6f);  // -2 * Phi(-2)
    EXPECT_NEAR(y[3], 0.3457312306f, 1e-6f);   // 0.5 * Phi(0.5)
    EXPECT_EQ(y[2], 0.0f);
  }
}

TEST(ActivationTest, GeluMatchesErfDefinitionAcrossRange) {
  std::vector<float> in;
  for (float v = -8.0f; v <= 8.0f; v += 0.01f) in.push_back(v);
  Activation gelu(LayerKind::kGELU, 0.0f);
  const std::vector<float> y = Apply(&gelu, in);
  for (size_t i = 0; i < in.size(); ++i) {
    const double x = in[i];
    const double ref = 0.5 * x * (1.0 + std::erf(x / std::sqrt(2.0)));
    ASSERT_NEAR(y[i], ref, 1e-6 * std::max(1.0, std::abs(x))) << "x=" << x;
  }
}

TEST(ActivationTest, SaturatingInputsStayFinite) {
  const std::vector<float> in = {-200.0f, -90.0f, 90.0f, 200.0f};
  Activation sigmoid(LayerKind::kSigmoid, 0.0f);
  std::vector<float> y = Apply(&sigmoid, in);
  for (int i : {0, 1}) {
    EXPECT_GE(y[i], 0.0f);
    EXPECT_LT(y[i], 1e-30f);
  }
  EXPECT_EQ(y[2], 1.0f);
  EXPECT_EQ(y[3], 1.0f);
  Activation tanh(LayerKind::kTanh, 0.0f);
  y = Apply(&tanh, in);
  EXPECT_EQ(y[0], -1.0f);
  EXPECT_EQ(y[3], 1.0f);
  Activation gelu(LayerKind::kGELU, 0.0f);
  y = Apply(&gelu, in);
  EXPECT_EQ(y[0], -0.0f);
  EXPECT_EQ(y[3], 200.0f);
}

TEST(ActivationTest, KeepsShapeAndHasNoParameters) {
  Activation relu(LayerKind::kReLU, 0.0f);
  Shape out;
  ASSERT_TRUE(relu.Build(Shape{3, 4, 5}, &out).ok());
  EXPECT_EQ(out, (Shape{3, 4, 5}));
  EXPECT_EQ(relu.NumParameters(), 0);
  EXPECT_TRUE(relu.parameters().empty());
  EXPECT_STREQ(relu.kind_name(), "ReLU");
  EXPECT_STREQ(Activation(LayerKind::kGELU, 0.0f).kind_name(), "GELU");
}

struct ActivationCase {
  LayerKind kind;
  float slope;
  bool spaced;  // inputs kept away from the kink at 0
};

void PrintTo(const ActivationCase& c, std::ostream* os) {
  *os << LayerKindName(c.kind) << "(slope " << c.slope << ")";
}

class ActivationGradTest : public ::testing::TestWithParam<ActivationCase> {};

TEST_P(ActivationGradTest, MatchesFiniteDifferences) {
  const ActivationCase& c = GetParam();
  Activation layer(c.kind, c.slope);
  const Shape sample{3, 2, 5};
  ASSERT_TRUE(BuildAndAllocate(&layer, sample, 1).ok());
  const Tensor x = c.spaced ? SpacedTensor(sample.WithBatch(4), 3, 0.05f)
                            : RandomTensor(sample.WithBatch(4), 3, -3.0f, 3.0f);
  ForwardContext ctx;
  ctx.training = true;
  ExpectGradientsMatch(CheckLayerGradients(&layer, x, ctx), layer.kind_name());
}

INSTANTIATE_TEST_SUITE_P(
    AllKinds, ActivationGradTest,
    ::testing::Values(ActivationCase{LayerKind::kReLU, 0.0f, true},
                      ActivationCase{LayerKind::kLeakyReLU, 0.01f, true},
                      ActivationCase{LayerKind::kLeakyReLU, 0.2f, true},
                      ActivationCase{LayerKind::kTanh, 0.0f, false},
                      ActivationCase{LayerKind::kSigmoid, 0.0f, false},
                      ActivationCase{LayerKind::kGELU, 0.0f, false}),
    [](const ::testing::TestParamInfo<ActivationCase>& info) {
      return std::string(LayerKindName(info.param.kind)) + std::to_string(info.index);
    });

TEST(DropoutTest, EvalIsIdentity) {
  Dropout drop(0.5f);
  ASSERT_TRUE(BuildAndAllocate(&drop, Shape{10}, 1).ok());
  const Tensor x = RandomTensor(Shape{8, 10}, 5);
  Rng rng(7);
  ForwardContext ctx;  // eval
  ctx.rng = &rng;
  const auto rng_before = rng.state();
  Tensor y;
  LayerCache cache;
  drop.Forward(x.view(), &y, &cache, ctx);
  ASSERT_EQ(y.shape(), x.shape());
  for (int64_t i = 0; i < x.size(); ++i) EXPECT_EQ(y.data()[i], x.data()[i]);
  EXPECT_EQ(rng.state(), rng_before) << "eval must not draw from the generator";
  const Tensor dy = RandomTensor(x.shape(), 6);
  Tensor dx;
  drop.Backward(x.view(), y, dy.view(), cache, ctx, &dx);
  for (int64_t i = 0; i < x.size(); ++i) EXPECT_EQ(dx.data()[i], dy.data()[i]);
}

TEST(DropoutTest, TrainingDropsFractionPAndScalesSurvivors) {
  for (float p : {0.1f, 0.5f, 0.8f}) {
    Dropout drop(p);
    const int64_t n = 200000;
    ASSERT_TRUE(BuildAndAllocate(&drop, Shape{n / 4}, 1).ok());
    Tensor x = RandomTensor(Shape{4, n / 4}, 9, 0.5f, 1.5f);  // no zeros in x
    Rng rng(11);
    ForwardContext ctx;
    ctx.training = true;
    ctx.rng = &rng;
    Tensor y;
    LayerCache cache;
    drop.Forward(x.view(), &y, &cache, ctx);
    int64_t zeros = 0;
    for (int64_t i = 0; i < n; ++i) {
      if (y.data()[i] == 0.0f) {
        ++zeros;
      } else {
        ASSERT_FLOAT_EQ(y.data()[i], x.data()[i] / (1.0f - p)) << "p=" << p << " i=" << i;
      }
    }
    // Binomial standard deviation is at most 0.0012 here; 0.006 is five of them.
    EXPECT_NEAR(static_cast<double>(zeros) / n, p, 0.006) << "p=" << p;

    // Backward applies the same mask and scale.
    const Tensor dy = RandomTensor(x.shape(), 10);
    Tensor dx;
    drop.Backward(x.view(), y, dy.view(), cache, ctx, &dx);
    for (int64_t i = 0; i < n; ++i) {
      if (y.data()[i] == 0.0f) {
        ASSERT_EQ(dx.data()[i], 0.0f);
      } else {
        ASSERT_FLOAT_EQ(dx.data()[i], dy.data()[i] / (1.0f - p));
      }
    }
  }
}

// The zero pattern of a training forward of ones with a generator seeded with seed.
std::vector<bool> MaskFor(uint64_t seed, Rng* rng_out = nullptr) {
  Dropout drop(0.5f);
  EXPECT_TRUE(BuildAndAllocate(&drop, Shape{64}, 1).ok());
  Tensor x(Shape{16, 64}, 1.0f);
  Rng rng(seed);
  ForwardContext ctx;
  ctx.training = true;
  ctx.rng = &rng;
  Tensor y;
  LayerCache cache;
  drop.Forward(x.view(), &y, &cache, ctx);
  if (rng_out != nullptr) *rng_out = rng;
  std::vector<bool> mask;
  for (int64_t i = 0; i < y.size(); ++i) mask.push_back(y.data()[i] == 0.0f);
  return mask;
}

TEST(DropoutTest, SameSeedSameMask) {
  Rng after_a, after_b;
  EXPECT_EQ(MaskFor(42, &after_a), MaskFor(42, &after_b));
  EXPECT_EQ(after_a.state(), after_b.state());
  EXPECT_NE(after_a.state(), Rng(42).state()) << "a training forward advances the generator";
  EXPECT_NE(MaskFor(42), MaskFor(43));
}

TEST(DropoutTest, ZeroAndOneProbabilities) {
  const Tensor x = RandomTensor(Shape{4, 25}, 2, 0.5f, 1.5f);
  Rng rng(3);
  ForwardContext ctx;
  ctx.training = true;
  ctx.rng = &rng;
  Tensor y;
  LayerCache cache;

  Dropout keep_all(0.0f);
  ASSERT_TRUE(BuildAndAllocate(&keep_all, Shape{25}, 1).ok());
  keep_all.Forward(x.view(), &y, &cache, ctx);
  for (int64_t i = 0; i < x.size(); ++i) EXPECT_EQ(y.data()[i], x.data()[i]);

  Dropout drop_all(1.0f);
  ASSERT_TRUE(BuildAndAllocate(&drop_all, Shape{25}, 1).ok());
  drop_all.Forward(x.view(), &y, &cache, ctx);
  for (int64_t i = 0; i < x.size(); ++i) EXPECT_EQ(y.data()[i], 0.0f);
  const Tensor dy = RandomTensor(x.shape(), 4);
  Tensor dx;
  drop_all.Backward(x.view(), y, dy.view(), cache, ctx, &dx);
  for (int64_t i = 0; i < x.size(); ++i) EXPECT_EQ(dx.data()[i], 0.0f);
}

TEST(DropoutTest, RejectsProbabilityOutsideUnitInterval) {
  Shape out;
  for (float p : {-0.1f, 1.5f, std::nanf("")}) {
    Dropout drop(p);
    const Status s = drop.Build(Shape{4}, &out);
    EXPECT_FALSE(s.ok()) << p;
    EXPECT_NE(s.message().find("dropout probability must be between 0 and 1"), std::string::npos)
        << s.message();
  }
}

TEST(DropoutTest, GradientsInTrainingAndEval) {
  Dropout drop(0.3f);
  ASSERT_TRUE(BuildAndAllocate(&drop, Shape{4, 6}, 1).ok());
  const Tensor x = RandomTensor(Shape{5, 4, 6}, 8);
  Rng rng(21);
  ForwardContext ctx;
  ctx.training = true;
  ctx.rng = &rng;
  ExpectGradientsMatch(CheckLayerGradients(&drop, x, ctx), "Dropout_train");
  ctx.training = false;
  ExpectGradientsMatch(CheckLayerGradients(&drop, x, ctx), "Dropout_eval");
}

TEST(FlattenTest, CollapsesPerSampleDimensions) {
  Flatten flatten;
  Shape out;
  ASSERT_TRUE(flatten.Build(Shape{2, 3, 4}, &out).ok());
  EXPECT_EQ(out, (Shape{24}));
  const Tensor x = RandomTensor(Shape{5, 2, 3, 4}, 1);
  Tensor y;
  LayerCache cache;
  flatten.Forward(x.view(), &y, &cache, ForwardContext{});
  EXPECT_EQ(y.shape(), (Shape{5, 24}));
  for (int64_t i = 0; i < x.size(); ++i) EXPECT_EQ(y.data()[i], x.data()[i]);
  const Tensor dy = RandomTensor(y.shape(), 2);
  Tensor dx;
  flatten.Backward(x.view(), y, dy.view(), cache, ForwardContext{}, &dx);
  EXPECT_EQ(dx.shape(), x.shape());
  for (int64_t i = 0; i < x.size(); ++i) EXPECT_EQ(dx.data()[i], dy.data()[i]);
  ExpectGradientsMatch(CheckLayerGradients(&flatten, x, ForwardContext{}), "Flatten");
}

TEST(FlattenTest, EmptyBatchKeepsFeatureCount) {
  Flatten flatten;
  Shape out;
  ASSERT_TRUE(flatten.Build(Shape{2, 3}, &out).ok());
  Tensor x(Shape{0, 2, 3});
  Tensor y;
  LayerCache cache;
  flatten.Forward(x.view(), &y, &cache, ForwardContext{});
  EXPECT_EQ(y.shape(), (Shape{0, 6}));
}

TEST(FlattenTest, RejectsScalarSamples) {
  Flatten flatten;
  Shape out;
  const Status s = flatten.Build(Shape{}, &out);
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.message().find("expects at least a 1-D per-sample input, got ()"),
            std::string::npos)
      << s.message();
}

}  // namespace
}  // namespace normd
