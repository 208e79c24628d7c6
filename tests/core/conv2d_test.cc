#include "core/conv2d.h"

#include <cmath>
#include <ostream>
#include <string>

#include "core/conv2d_direct.h"
#include "gtest/gtest.h"
#include "tests/core/gradcheck.h"

namespace normd {
namespace {

using testing::BuildAndAllocate;
using testing::CheckLayerGradients;
using testing::ExpectGradientsMatch;
using testing::RandomTensor;

Conv2dConfig Config(int64_t cin, int64_t cout, int64_t k, int64_t stride = 1,
                    int64_t padding = 0, bool bias = true, int64_t groups = 1) {
  Conv2dConfig c;
  c.in_channels = cin;
  c.out_channels = cout;
  c.kernel_size = k;
  c.stride = stride;
  c.padding = padding;
  c.bias = bias;
  c.groups = groups;
  return c;
}

// Direct definition of the convolution, in double: the reference for the im2col path. Output
// channel o of group o / (C_out / G) reads the group's C_in / G input channels through
// weight[o, i, :, :] (PyTorch's layout).
std::vector<double> NaiveConv(const Conv2dConfig& c, const Tensor& x, const Tensor& w,
                              const Tensor* b, int64_t h_out, int64_t w_out) {
  const int64_t n = x.shape()[0], h = x.shape()[2], wd = x.shape()[3], k = c.kernel_size;
  const int64_t cin_g = c.in_channels / c.groups, cout_g = c.out_channels / c.groups;
  std::vector<double> y;
  for (int64_t s = 0; s < n; ++s) {
    for (int64_t o = 0; o < c.out_channels; ++o) {
      const int64_t first_in = o / cout_g * cin_g;
      for (int64_t oh = 0; oh < h_out; ++oh) {
        for (int64_t ow = 0; ow < w_out; ++ow) {
          double acc = b != nullptr ? b->data()[o] : 0.0;
          for (int64_t i = 0; i < cin_g; ++i) {
            for (int64_t ki = 0; ki < k; ++ki) {
              for (int64_t kj = 0; kj < k; ++kj) {
                const int64_t ih = oh * c.stride - c.padding + ki;
                const int64_t iw = ow * c.stride - c.padding + kj;
                if (ih < 0 || ih >= h || iw < 0 || iw >= wd) continue;
                acc += double{x.data()[((s * c.in_channels + first_in + i) * h + ih) * wd + iw]} *
                       w.data()[((o * cin_g + i) * k + ki) * k + kj];
              }
            }
          }
          y.push_back(acc);
        }
      }
    }
  }
  return y;
}

TEST(Conv2dTest, KnownThreeByThree) {
  Conv2d conv(Config(1, 1, 3, 1, 1));
  Shape out;
  ASSERT_TRUE(BuildAndAllocate(&conv, Shape{1, 3, 3}, 1, &out).ok());
  EXPECT_EQ(out, (Shape{1, 3, 3}));
  std::vector<Parameter*> params = conv.parameters();
  ASSERT_EQ(params.size(), 2u);
  params[0]->value.Fill(1.0f);  // a box filter: each output sums its padded 3x3 neighbourhood
  params[1]->value.Fill(0.5f);
  Tensor x(Shape{1, 1, 3, 3});
  for (int i = 0; i < 9; ++i) x.data()[i] = static_cast<float>(i + 1);
  Tensor y;
  LayerCache cache;
  conv.Forward(x.view(), &y, &cache, ForwardContext{});
  ASSERT_EQ(y.shape(), (Shape{1, 1, 3, 3}));
  const float expected[9] = {12, 21, 16, 27, 45, 33, 24, 39, 28};
  for (int i = 0; i < 9; ++i) EXPECT_FLOAT_EQ(y.data()[i], expected[i] + 0.5f) << i;
}

TEST(Conv2dTest, KnownKernelWithoutPadding) {
  Conv2d conv(Config(1, 1, 2, 1, 0, /*bias=*/false));
  ASSERT_TRUE(BuildAndAllocate(&conv, Shape{1, 3, 3}, 1).ok());
  ASSERT_EQ(conv.parameters().size(), 1u);
  // [[1, 0], [0, -1]]: top-left minus bottom-right, PyTorch's cross-correlation orientation.
  float* w = conv.parameters()[0]->value.data();
  w[0] = 1.0f;
  w[1] = 0.0f;
  w[2] = 0.0f;
  w[3] = -1.0f;
  Tensor x(Shape{1, 1, 3, 3});
  for (int i = 0; i < 9; ++i) x.data()[i] = static_cast<float>(i * i);
  Tensor y;
  LayerCache cache;
  conv.Forward(x.view(), &y, &cache, ForwardContext{});
  ASSERT_EQ(y.shape(), (Shape{1, 1, 2, 2}));
  EXPECT_FLOAT_EQ(y.data()[0], 0.0f - 16.0f);
  EXPECT_FLOAT_EQ(y.data()[1], 1.0f - 25.0f);
  EXPECT_FLOAT_EQ(y.data()[2], 9.0f - 49.0f);
  EXPECT_FLOAT_EQ(y.data()[3], 16.0f - 64.0f);
}

struct ConvCase {
  Conv2dConfig config;
  Shape sample;  // (C, H, W)
};

std::string CaseName(const ConvCase& c) {
  const Conv2dConfig& k = c.config;
  return "c" + std::to_string(k.in_channels) + "o" + std::to_string(k.out_channels) + "k" +
         std::to_string(k.kernel_size) + "s" + std::to_string(k.stride) + "p" +
         std::to_string(k.padding) + (k.bias ? "" : "nobias") +
         (k.groups > 1 ? "g" + std::to_string(k.groups) : "") + "_" +
         std::to_string(c.sample[1]) + "x" + std::to_string(c.sample[2]);
}

void PrintTo(const ConvCase& c, std::ostream* os) { *os << CaseName(c); }

class Conv2dCaseTest : public ::testing::TestWithParam<ConvCase> {};

TEST_P(Conv2dCaseTest, ForwardMatchesDirectConvolution) {
  const ConvCase& c = GetParam();
  Conv2d conv(c.config);
  Shape out;
  ASSERT_TRUE(BuildAndAllocate(&conv, c.sample, 5, &out).ok());
  const Tensor x = RandomTensor(c.sample.WithBatch(3), 6);
  Tensor y(Shape{1}, 99.0f);  // reused storage of another shape
  LayerCache cache;
  conv.Forward(x.view(), &y, &cache, ForwardContext{});
  ASSERT_EQ(y.shape(), out.WithBatch(3));
  std::vector<Parameter*> params = conv.parameters();
  const std::vector<double> ref = NaiveConv(c.config, x, params[0]->value,
                                            c.config.bias ? &params[1]->value : nullptr,
                                            out[1], out[2]);
  ASSERT_EQ(static_cast<int64_t>(ref.size()), y.size());
  for (int64_t i = 0; i < y.size(); ++i) EXPECT_NEAR(y.data()[i], ref[i], 1e-5) << i;
}

TEST_P(Conv2dCaseTest, GradientsMatchFiniteDifferences) {
  const ConvCase& c = GetParam();
  Conv2d conv(c.config);
  ASSERT_TRUE(BuildAndAllocate(&conv, c.sample, 7).ok());
  const Tensor x = RandomTensor(c.sample.WithBatch(2), 8);
  ExpectGradientsMatch(CheckLayerGradients(&conv, x, ForwardContext{}), "Conv2d_" + CaseName(c));
}

INSTANTIATE_TEST_SUITE_P(
    Geometries, Conv2dCaseTest,
    ::testing::Values(ConvCase{Config(2, 3, 3, 1, 1), Shape{2, 5, 5}},
                      ConvCase{Config(3, 2, 3, 2, 0), Shape{3, 7, 6}},
                      ConvCase{Config(2, 4, 1, 1, 0), Shape{2, 4, 3}},  // 1x1: no im2col
                      ConvCase{Config(2, 2, 1, 2, 1), Shape{2, 4, 5}},
                      ConvCase{Config(1, 3, 2, 2, 1, false), Shape{1, 5, 4}},
                      ConvCase{Config(2, 2, 4, 3, 2), Shape{2, 6, 7}},
                      ConvCase{Config(1, 1, 5, 1, 2), Shape{1, 3, 3}},  // kernel > input
                      // Grouped: two groups; depthwise (groups = channels) with stride 2, as
                      // MobileNet's; depthwise with a channel multiplier of 2; a grouped 1x1
                      // (the direct path, no im2col).
                      ConvCase{Config(4, 6, 3, 1, 1, true, 2), Shape{4, 5, 4}},
                      ConvCase{Config(3, 3, 3, 2, 1, false, 3), Shape{3, 7, 7}},
                      ConvCase{Config(2, 4, 3, 1, 0, true, 2), Shape{2, 5, 6}},
                      ConvCase{Config(4, 8, 1, 1, 0, false, 4), Shape{4, 3, 3}}),
    [](const ::testing::TestParamInfo<ConvCase>& info) { return CaseName(info.param); });

// The shapes DirectConvolution tiles (groups 1, kernels above 1x1) at channel counts that fill
// whole vectors and leave partial ones, planes wide enough for the whole-block transposes, the
// stride-1 row-reuse kernels and the generic ones (stride 2 and 3, kernel 5), padding beyond
// kernel - 1 (its input gradient falls back to col2im), and the Winograd passes. Forward,
// weight and input gradients against the definition in double, at float32 accuracy for sums
// of this length.
struct ConvGradients {
  std::vector<double> dw, dx;
};

ConvGradients NaiveConvBackward(const Conv2dConfig& c, const Tensor& x, const Tensor& w,
                                const Tensor& dy) {
  const int64_t n = x.shape()[0], h = x.shape()[2], wd = x.shape()[3], k = c.kernel_size;
  const int64_t h_out = dy.shape()[2], w_out = dy.shape()[3];
  ConvGradients g;
  g.dw.assign(w.size(), 0.0);
  g.dx.assign(x.size(), 0.0);
  for (int64_t s = 0; s < n; ++s) {
    for (int64_t o = 0; o < c.out_channels; ++o) {
      for (int64_t oh = 0; oh < h_out; ++oh) {
        for (int64_t ow = 0; ow < w_out; ++ow) {
          const double d = dy.data()[((s * c.out_channels + o) * h_out + oh) * w_out + ow];
          for (int64_t i = 0; i < c.in_channels; ++i) {
            for (int64_t ki = 0; ki < k; ++ki) {
              for (int64_t kj = 0; kj < k; ++kj) {
                const int64_t ih = oh * c.stride - c.padding + ki;
                const int64_t iw = ow * c.stride - c.padding + kj;
                if (ih < 0 || ih >= h || iw < 0 || iw >= wd) continue;
                const int64_t xi = ((s * c.in_channels + i) * h + ih) * wd + iw;
                const int64_t wi = ((o * c.in_channels + i) * k + ki) * k + kj;
                g.dw[wi] += d * x.data()[xi];
                g.dx[xi] += d * w.data()[wi];
              }
            }
          }
        }
      }
    }
  }
  return g;
}

// |a - b| within float32 rounding of a sum of `terms` products of values in [-1, 1].
void ExpectClose(const float* got, const std::vector<double>& want, int64_t terms,
                 const std::string& what) {
  const double tol = 2e-6 * std::sqrt(static_cast<double>(terms)) + 1e-6;
  int64_t bad = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    if (std::abs(got[i] - want[i]) > tol * (1.0 + std::abs(want[i])) && ++bad <= 5) {
      ADD_FAILURE() << what << "[" << i << "] = " << got[i] << ", want " << want[i];
    }
  }
  EXPECT_EQ(bad, 0) << what;
}

class Conv2dTiledTest : public ::testing::TestWithParam<ConvCase> {};

TEST_P(Conv2dTiledTest, ForwardAndGradientsMatchDefinition) {
  const ConvCase& c = GetParam();
  Conv2d conv(c.config);
  Shape out;
  ASSERT_TRUE(BuildAndAllocate(&conv, c.sample, 11, &out).ok());
  const int64_t n = 3;
  const Tensor x = RandomTensor(c.sample.WithBatch(n), 12);
  const Tensor dy = RandomTensor(out.WithBatch(n), 13);
  std::vector<Parameter*> params = conv.parameters();
  for (Parameter* p : params) p->grad.SetZero();
  Tensor y, dx;
  LayerCache cache;
  ForwardContext ctx;
  ctx.training = true;
  conv.Forward(x.view(), &y, &cache, ctx);
  conv.Backward(x.view(), y, dy.view(), cache, ctx, &dx);
  const Conv2dConfig& k = c.config;
  const int64_t taps = k.in_channels * k.kernel_size * k.kernel_size;
  ExpectClose(y.data(),
              NaiveConv(k, x, params[0]->value, k.bias ? &params[1]->value : nullptr, out[1],
                        out[2]),
              taps, "y");
  const ConvGradients want = NaiveConvBackward(k, x, params[0]->value, dy);
  ExpectClose(params[0]->grad.data(), want.dw, n * out[1] * out[2], "dweight");
  ASSERT_EQ(dx.shape(), x.shape());
  ExpectClose(dx.data(), want.dx, k.out_channels * k.kernel_size * k.kernel_size, "dx");
  if (k.bias) {
    std::vector<double> db(k.out_channels, 0.0);
    const int64_t plane = out[1] * out[2];
    for (int64_t i = 0; i < dy.size(); ++i) db[i / plane % k.out_channels] += dy.data()[i];
    ExpectClose(params[1]->grad.data(), db, n * plane, "dbias");
  }
  // A second backward accumulates the weight gradient and overwrites dx.
  conv.Backward(x.view(), y, dy.view(), cache, ctx, &dx);
  std::vector<double> twice = want.dw;
  for (double& v : twice) v *= 2.0;
  ExpectClose(params[0]->grad.data(), twice, 2 * n * out[1] * out[2], "dweight twice");
  ExpectClose(dx.data(), want.dx, k.out_channels * k.kernel_size * k.kernel_size, "dx again");
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, Conv2dTiledTest,
    ::testing::Values(ConvCase{Config(16, 32, 3, 1, 1, false), Shape{16, 18, 17}},  // 2 vectors
                      ConvCase{Config(3, 32, 3, 1, 1), Shape{3, 32, 32}},           // a stem
                      ConvCase{Config(17, 16, 3, 1, 1), Shape{17, 16, 16}},  // 1 vector, 16 wide
                      ConvCase{Config(5, 48, 3, 2, 1), Shape{5, 16, 20}},  // 3 vectors, stride 2
                      ConvCase{Config(32, 20, 3, 1, 0), Shape{32, 17, 16}},  // no padding
                      ConvCase{Config(16, 16, 5, 1, 2), Shape{16, 16, 18}},  // generic kernel
                      ConvCase{Config(8, 32, 3, 1, 3, false), Shape{8, 9, 9}},  // pad > k - 1
                      ConvCase{Config(4, 16, 2, 3, 1), Shape{4, 11, 13}},       // stride 3
                      ConvCase{Config(2, 7, 3, 1, 1), Shape{2, 1, 1}},          // 1x1 plane
                      // The planar forward (stride 1, at most 4 input channels, output rows
                      // of at least one vector): output channels past a whole block of 8 (4
                      // without AVX-512), rows that end mid-vector, padding 0 and 2, 1 and 4
                      // channels, kernels 5 and 7, no bias.
                      ConvCase{Config(3, 20, 3, 1, 1), Shape{3, 9, 37}},
                      ConvCase{Config(1, 9, 3, 1, 0, false), Shape{1, 6, 19}},
                      ConvCase{Config(4, 16, 5, 1, 2), Shape{4, 7, 23}},
                      ConvCase{Config(3, 8, 7, 1, 3), Shape{3, 8, 40}},
                      // Winograd F(2x2, 3x3) (>= 32 channels into >= 32, stride 1): odd
                      // planes whose last tiles reach past the outputs, partial vectors,
                      // padding 0 and 2 (the input gradient's 2 and 0), padding beyond
                      // kernel - 1 (forward only), rows of more than one vector of tiles.
                      ConvCase{Config(32, 32, 3, 1, 1), Shape{32, 9, 11}},
                      ConvCase{Config(33, 40, 3, 1, 0, false), Shape{33, 12, 7}},
                      ConvCase{Config(32, 48, 3, 1, 2), Shape{32, 5, 6}},
                      ConvCase{Config(32, 32, 3, 1, 3, false), Shape{32, 6, 5}},
                      ConvCase{Config(32, 33, 3, 1, 1), Shape{32, 40, 37}}),
    [](const ::testing::TestParamInfo<ConvCase>& info) { return CaseName(info.param); });

// DirectConvolution's Winograd passes forced on (Shape::Winograd::kAlways, which
// kernels_bench's ConvKernel benchmarks use) agree with the direct tiles (kNever) on channel
// counts the layer itself keeps direct, with padding 0, 1 and 2 and odd planes: forward, input
// gradient and an accumulated weight gradient, at float32 accuracy for sums of this length.
TEST(Conv2dTest, ForcedWinogradMatchesTheDirectTiles) {
  using Shape2d = DirectConvolution::Shape;
  struct Case {
    int64_t cin, cout, h, w, pad;
  };
  for (const Case& k : {Case{3, 5, 7, 9, 1}, Case{16, 16, 6, 5, 0}, Case{8, 20, 5, 8, 2}}) {
    SCOPED_TRACE(::testing::Message() << k.cin << "->" << k.cout << " pad " << k.pad);
    const int64_t n = 3, h_out = k.h + 2 * k.pad - 2, w_out = k.w + 2 * k.pad - 2;
    const Tensor x = RandomTensor(Shape{n, k.cin, k.h, k.w}, 21);
    const Tensor weight = RandomTensor(Shape{k.cout, k.cin, 3, 3}, 22);
    const Tensor bias = RandomTensor(Shape{k.cout}, 23);
    const Tensor dy = RandomTensor(Shape{n, k.cout, h_out, w_out}, 24);
    Tensor y[2], dx[2], dw[2];
    for (int i = 0; i < 2; ++i) {
      Shape2d shape{k.cin, k.cout, k.h, k.w, 3, 1, k.pad};
      shape.winograd = i == 0 ? Shape2d::Winograd::kAlways : Shape2d::Winograd::kNever;
      const DirectConvolution conv(shape);
      y[i] = Tensor(dy.shape());
      dx[i] = Tensor(x.shape());
      dw[i] = Tensor(weight.shape(), 0.5f);  // accumulated into
      conv.Forward(x.data(), n, weight.data(), bias.data(), y[i].data());
      conv.InputGradient(dy.data(), n, weight.data(), dx[i].data());
      conv.AccumulateWeightGradient(x.data(), dy.data(), n, dw[i].data());
    }
    auto expect_close = [](const Tensor& a, const Tensor& b, int64_t terms, const char* what) {
      const double tol = 4e-6 * std::sqrt(static_cast<double>(terms)) + 1e-6;
      int64_t bad = 0;
      for (int64_t j = 0; j < a.size(); ++j) {
        const double d = std::abs(double{a.data()[j]} - double{b.data()[j]});
        if (d > tol * (1.0 + std::abs(double{b.data()[j]})) && ++bad <= 3) {
          ADD_FAILURE() << what << "[" << j << "]: " << a.data()[j] << " vs " << b.data()[j];
        }
      }
      EXPECT_EQ(bad, 0) << what;
    };
    expect_close(y[0], y[1], k.cin * 9, "y");
    expect_close(dx[0], dx[1], k.cout * 9, "dx");
    expect_close(dw[0], dw[1], n * h_out * w_out, "dweight");
  }
}

TEST(Conv2dTest, SamplesAreIndependent) {
  Conv2d conv(Config(2, 3, 3, 1, 1));
  ASSERT_TRUE(BuildAndAllocate(&conv, Shape{2, 4, 4}, 1).ok());
  const Tensor batch = RandomTensor(Shape{3, 2, 4, 4}, 2);
  Tensor y_batch, y_one;
  LayerCache cache;
  conv.Forward(batch.view(), &y_batch, &cache, ForwardContext{});
  const int64_t in_sample = 2 * 4 * 4, out_sample = 3 * 4 * 4;
  for (int64_t s = 0; s < 3; ++s) {
    conv.Forward(ConstTensorView{batch.data() + s * in_sample, Shape{1, 2, 4, 4}}, &y_one,
                 &cache, ForwardContext{});
    for (int64_t i = 0; i < out_sample; ++i) {
      EXPECT_EQ(y_one.data()[i], y_batch.data()[s * out_sample + i]) << s << " " << i;
    }
  }
}

TEST(Conv2dTest, InitialisationFollowsPyTorch) {
  Conv2d conv(Config(16, 64, 3));
  ASSERT_TRUE(BuildAndAllocate(&conv, Shape{16, 8, 8}, 123).ok());
  EXPECT_EQ(conv.NumParameters(), 64 * 16 * 9 + 64);
  std::vector<Parameter*> params = conv.parameters();
  ASSERT_EQ(params.size(), 2u);
  EXPECT_EQ(params[0]->name, "weight");
  EXPECT_EQ(params[1]->name, "bias");
  EXPECT_EQ(params[0]->value.shape(), (Shape{64, 16, 3, 3}));
  EXPECT_EQ(params[1]->value.shape(), (Shape{64}));
  EXPECT_EQ(params[0]->grad.shape(), params[0]->value.shape());
  EXPECT_EQ(params[1]->grad.shape(), params[1]->value.shape());
  for (Parameter* p : params) {
    for (int64_t i = 0; i < p->grad.size(); ++i) ASSERT_EQ(p->grad.data()[i], 0.0f);
  }

  const double bound = 1.0 / std::sqrt(16.0 * 9.0);
  double sum = 0.0, sum2 = 0.0;
  const Tensor& w = params[0]->value;
  for (int64_t i = 0; i < w.size(); ++i) {
    ASSERT_LE(std::abs(w.data()[i]), bound);
    sum += w.data()[i];
    sum2 += double{w.data()[i]} * w.data()[i];
  }
  const double mean = sum / w.size();
  const double std = std::sqrt(sum2 / w.size() - mean * mean);
  EXPECT_NEAR(mean, 0.0, 0.02 * bound);
  EXPECT_NEAR(std, bound / std::sqrt(3.0), 0.02 * bound);  // U(-b, b) has std b / sqrt(3)
  const Tensor& b = params[1]->value;
  bool bias_varies = false;
  for (int64_t i = 0; i < b.size(); ++i) {
    ASSERT_LE(std::abs(b.data()[i]), bound);
    bias_varies |= b.data()[i] != b.data()[0];
  }
  EXPECT_TRUE(bias_varies);

  // Deterministic from the seed.
  Conv2d same(Config(16, 64, 3)), other(Config(16, 64, 3));
  ASSERT_TRUE(BuildAndAllocate(&same, Shape{16, 8, 8}, 123).ok());
  ASSERT_TRUE(BuildAndAllocate(&other, Shape{16, 8, 8}, 124).ok());
  const Tensor& ws = same.parameters()[0]->value;
  const Tensor& wo = other.parameters()[0]->value;
  EXPECT_TRUE(std::equal(w.data(), w.data() + w.size(), ws.data()));
  EXPECT_FALSE(std::equal(w.data(), w.data() + w.size(), wo.data()));
}

TEST(Conv2dTest, GroupedWeightIsOutByInPerGroup) {
  Conv2d conv(Config(8, 12, 3, 1, 1, true, 4));
  ASSERT_TRUE(BuildAndAllocate(&conv, Shape{8, 6, 6}, 3).ok());
  EXPECT_EQ(conv.NumParameters(), 12 * 2 * 9 + 12);
  std::vector<Parameter*> params = conv.parameters();
  EXPECT_EQ(params[0]->value.shape(), (Shape{12, 2, 3, 3}));
  // PyTorch's bound uses the group's fan-in, (C_in / G) * k * k.
  const double bound = 1.0 / std::sqrt(2.0 * 9.0);
  double largest = 0.0;
  for (int64_t i = 0; i < params[0]->value.size(); ++i) {
    largest = std::max(largest, double{std::abs(params[0]->value.data()[i])});
  }
  EXPECT_LE(largest, bound);
  EXPECT_GT(largest, 0.9 * bound);
}

TEST(Conv2dTest, GroupsSeeOnlyTheirOwnChannels) {
  // Depthwise: output channel c depends on input channel c alone.
  Conv2d conv(Config(3, 3, 3, 1, 1, false, 3));
  ASSERT_TRUE(BuildAndAllocate(&conv, Shape{3, 4, 4}, 4).ok());
  Tensor x = RandomTensor(Shape{1, 3, 4, 4}, 5);
  Tensor y0, y1;
  LayerCache cache;
  conv.Forward(x.view(), &y0, &cache, ForwardContext{});
  for (int64_t i = 16; i < 32; ++i) x.data()[i] += 1.0f;  // change channel 1 only
  conv.Forward(x.view(), &y1, &cache, ForwardContext{});
  for (int64_t i = 0; i < 48; ++i) {
    if (i >= 16 && i < 32) {
      EXPECT_NE(y0.data()[i], y1.data()[i]) << i;
    } else {
      EXPECT_EQ(y0.data()[i], y1.data()[i]) << i;
    }
  }
}

TEST(Conv2dTest, NoBiasHasOnlyWeight) {
  Conv2d conv(Config(3, 4, 3, 1, 0, false));
  ASSERT_TRUE(BuildAndAllocate(&conv, Shape{3, 5, 5}, 1).ok());
  EXPECT_EQ(conv.NumParameters(), 4 * 3 * 9);
  ASSERT_EQ(conv.parameters().size(), 1u);
  EXPECT_EQ(conv.parameters()[0]->name, "weight");
}

// Build's error message for a config and per-sample input.
std::string BuildError(const Conv2dConfig& config, const Shape& sample) {
  Conv2d conv(config);
  Shape out;
  const Status s = conv.Build(sample, &out);
  EXPECT_FALSE(s.ok());
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  return s.message();
}

TEST(Conv2dTest, BuildRejectsBadShapes) {
  EXPECT_EQ(BuildError(Config(1, 2, 3), Shape{10}),
            "expects a 3-D per-sample input (C, H, W), got (10)");
  EXPECT_EQ(BuildError(Config(1, 2, 3), Shape{1, 2, 3, 4}),
            "expects a 3-D per-sample input (C, H, W), got (1, 2, 3, 4)");
  EXPECT_EQ(BuildError(Config(1, 2, 5), Shape{1, 3, 3}),
            "kernel_size 5 is larger than the padded input 3x3");
  EXPECT_EQ(BuildError(Config(1, 2, 5, 1, 1), Shape{1, 2, 8}),
            "kernel_size 5 is larger than the padded input 4x10");
  EXPECT_EQ(BuildError(Config(3, 2, 3), Shape{1, 8, 8}),
            "in_channels is 3 but the input has 1 channels");
}

TEST(Conv2dTest, BuildRejectsBadConfig) {
  EXPECT_NE(BuildError(Config(1, 2, 0), Shape{1, 4, 4}).find("kernel_size must be positive"),
            std::string::npos);
  EXPECT_NE(BuildError(Config(1, 2, 3, 0), Shape{1, 4, 4}).find("stride must be positive"),
            std::string::npos);
  EXPECT_NE(BuildError(Config(1, 2, 3, 1, -1), Shape{1, 4, 4}).find("padding"),
            std::string::npos);
  EXPECT_NE(BuildError(Config(1, 0, 3), Shape{1, 4, 4}).find("must be positive"),
            std::string::npos);
  EXPECT_EQ(BuildError(Config(6, 4, 3, 1, 0, true, 4), Shape{6, 4, 4}),
            "in_channels (6) and out_channels (4) must both be divisible by groups (4)");
  EXPECT_EQ(BuildError(Config(4, 6, 3, 1, 0, true, 4), Shape{4, 4, 4}),
            "in_channels (4) and out_channels (6) must both be divisible by groups (4)");
  EXPECT_EQ(BuildError(Config(4, 4, 3, 1, 0, true, 0), Shape{4, 4, 4}),
            "groups must be positive, got 0");
  // A column buffer of billions of values is refused before anything is allocated.
  EXPECT_NE(BuildError(Config(64, 1, 64, 1, 32), Shape{64, 512, 512}).find("im2col"),
            std::string::npos);
}

}  // namespace
}  // namespace normd
