// core/residual: the block's forward is body(x) + shortcut(x), its gradients match finite
// differences (train and eval BatchNorm, projection and identity shortcuts, grouped
// convolutions, nesting, dropout), and Build checks that the branches meet.
#include "core/residual.h"

#include <gtest/gtest.h>

#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/sequential.h"
#include "tests/core/gradcheck.h"
#include "tests/core/layer_configs.h"

namespace normd {
namespace {

using testing::CheckLayerGradients;
using testing::ExpectGradientsMatch;
using testing::RandomTensor;
using testing::Bn2d;
using testing::Conv;
using testing::Dropout;
using testing::Residual;
using testing::Simple;

// A Sequential holding the block alone: Sequential::Create builds a block's branches.
std::unique_ptr<Sequential> BuildBlock(const Shape& sample, const LayerConfig& block,
                                       uint64_t seed = 3) {
  std::unique_ptr<Sequential> net;
  Status s = Sequential::Create(sample.ToVector(), {block}, seed, Sequential::Limits(), &net);
  EXPECT_TRUE(s.ok()) << s.message();
  return net;
}

// Moves every BatchNorm's affine parameters and running statistics away from 1 and 0, so
// every factor of the gradient shows, and scales the convolution weights up by 4: a train-mode
// BatchNorm's output does not change when the weights feeding it are scaled, but its curvature
// along them falls with the square of their norm, and at PyTorch's initial scale the central
// difference's own error (~1e-3 at the step of 1e-2) would hide a wrong gradient.
void Randomise(Layer* layer, uint64_t seed) {
  for (StateSlot& slot : layer->state()) {
    if (slot.tensor == nullptr) continue;
    const std::string& n = slot.name;
    if (slot.tensor->shape().rank() == 4) {
      for (int64_t i = 0; i < slot.tensor->size(); ++i) slot.tensor->data()[i] *= 4.0f;
    }
    const bool bn_weight = n.size() > 7 && n.compare(n.size() - 7, 7, ".weight") == 0 &&
                           slot.tensor->shape().rank() == 1;
    if (bn_weight) *slot.tensor = RandomTensor(slot.tensor->shape(), ++seed, 0.5f, 1.5f);
    if (n.find("running_mean") != std::string::npos) {
      *slot.tensor = RandomTensor(slot.tensor->shape(), ++seed, -0.5f, 0.5f);
    }
    if (n.find("running_var") != std::string::npos) {
      *slot.tensor = RandomTensor(slot.tensor->shape(), ++seed, 0.5f, 2.0f);
    }
  }
}

struct BlockCase {
  std::string name;
  Shape sample;
  LayerConfig block;
};

std::vector<BlockCase> Cases() {
  const LayerKind tanh = LayerKind::kTanh;  // smooth: no kink within the difference step
  return {
      {"basic_identity", Shape{4, 5, 5},
       Residual({Conv(4, 4, 3, 1, 1), Bn2d(4), Simple(tanh), Conv(4, 4, 3, 1, 1), Bn2d(4)})},
      {"basic_projection_stride2", Shape{3, 6, 6},
       Residual({Conv(3, 6, 3, 2, 1), Bn2d(6), Simple(tanh), Conv(6, 6, 3, 1, 1), Bn2d(6)},
                {Conv(3, 6, 1, 2, 0), Bn2d(6)})},
      {"bottleneck", Shape{8, 4, 4},
       Residual({Conv(8, 2, 1), Bn2d(2), Simple(tanh), Conv(2, 2, 3, 1, 1), Bn2d(2),
                 Simple(tanh), Conv(2, 8, 1), Bn2d(8)})},
      {"depthwise_separable", Shape{4, 5, 5},
       Residual({Conv(4, 4, 3, 1, 1, 4), Bn2d(4), Simple(tanh), Conv(4, 4, 1), Bn2d(4)})},
      {"nested", Shape{2, 4, 4},
       Residual({Conv(2, 3, 3, 1, 1), Bn2d(3),
                 Residual({Simple(tanh), Conv(3, 3, 1), Bn2d(3)}), Simple(tanh)},
                {Conv(2, 3, 1)})},
  };
}

class ResidualGradTest : public ::testing::TestWithParam<std::tuple<int, bool>> {};

TEST_P(ResidualGradTest, MatchesFiniteDifferences) {
  const BlockCase c = Cases()[std::get<0>(GetParam())];
  const bool training = std::get<1>(GetParam());
  std::unique_ptr<Sequential> net = BuildBlock(c.sample, c.block);
  ASSERT_NE(net, nullptr);
  Layer& block = net->layer(0);
  ASSERT_NE(block.AsResidualBlock(), nullptr);
  Randomise(&block, 10);
  ForwardContext ctx;
  ctx.training = training;
  ctx.update_running_stats = training;
  const Tensor x = RandomTensor(c.sample.WithBatch(3), 11, -2.0f, 2.0f);
  ExpectGradientsMatch(CheckLayerGradients(&block, x, ctx),
                       c.name + (training ? "_train" : "_eval"));
}

INSTANTIATE_TEST_SUITE_P(
    Blocks, ResidualGradTest,
    ::testing::Combine(::testing::Range(0, static_cast<int>(Cases().size())), ::testing::Bool()),
    [](const ::testing::TestParamInfo<std::tuple<int, bool>>& info) {
      return Cases()[std::get<0>(info.param)].name +
             (std::get<1>(info.param) ? "_train" : "_eval");
    });

TEST(ResidualTest, DropoutInTheBodyKeepsItsMaskAcrossTheCheck) {
  std::unique_ptr<Sequential> net = BuildBlock(
      Shape{6}, Residual({Simple(LayerKind::kTanh), Dropout(0.3f), Simple(LayerKind::kSigmoid)}));
  Rng rng(5);
  ForwardContext ctx;
  ctx.training = true;
  ctx.rng = &rng;
  ExpectGradientsMatch(CheckLayerGradients(&net->layer(0), RandomTensor(Shape{4, 6}, 6), ctx),
                       "residual_dropout");
}

// The block computes body(x) + shortcut(x): against Sequentials holding the branches' layers
// with the same state ("body.j.*" is the branch's "j.*").
TEST(ResidualTest, OutputIsBodyPlusShortcut) {
  const Shape sample{3, 6, 6};
  const std::vector<LayerConfig> body = {Conv(3, 6, 3, 2, 1), Bn2d(6),
                                         Simple(LayerKind::kReLU), Conv(6, 6, 3, 1, 1)};
  const std::vector<LayerConfig> shortcut = {Conv(3, 6, 1, 2, 0), Bn2d(6)};
  for (bool identity : {false, true}) {
    const Shape in = identity ? Shape{6, 3, 3} : sample;
    std::vector<LayerConfig> b = body;
    if (identity) b = {Conv(6, 6, 3, 1, 1), Bn2d(6), Simple(LayerKind::kReLU)};
    std::unique_ptr<Sequential> net =
        BuildBlock(in, Residual(b, identity ? std::vector<LayerConfig>{} : shortcut));
    Randomise(&net->layer(0), 20);
    std::unique_ptr<Sequential> body_net, shortcut_net;
    ASSERT_TRUE(Sequential::Create(in.ToVector(), b, 9, {}, &body_net).ok());
    std::map<std::string, StateSlot> block_state;
    for (StateSlot& s : net->state()) block_state[s.name] = s;
    for (StateSlot& s : body_net->state()) {
      const StateSlot& from = block_state.at("0.body." + s.name);
      if (s.tensor != nullptr) *s.tensor = *from.tensor;
    }
    if (!identity) {
      ASSERT_TRUE(Sequential::Create(in.ToVector(), shortcut, 9, {}, &shortcut_net).ok());
      for (StateSlot& s : shortcut_net->state()) {
        const StateSlot& from = block_state.at("0.shortcut." + s.name);
        if (s.tensor != nullptr) *s.tensor = *from.tensor;
      }
    }
    for (bool training : {true, false}) {
      ForwardContext ctx;
      ctx.training = training;
      const Tensor x = RandomTensor(in.WithBatch(2), 21);
      ForwardRecord rec, rb, rs;
      net->Forward(x.view(), ctx, &rec);
      body_net->Forward(x.view(), ctx, &rb);
      const float* skip = x.data();
      if (!identity) {
        shortcut_net->Forward(x.view(), ctx, &rs);
        skip = rs.output().data();
      }
      ASSERT_EQ(rec.output().shape(), rb.output().shape());
      for (int64_t i = 0; i < rec.output().size(); ++i) {
        ASSERT_EQ(rec.output().data()[i], rb.output().data()[i] + skip[i])
            << "identity " << identity << " training " << training << " at " << i;
      }
    }
  }
}

// A ReLU after the block runs fused with it (relu(body + shortcut) in one pass; the body's
// BatchNorm + ReLU are fused too): the same bits as the block's Forward and Backward followed
// and preceded by the ReLU layer's, the sum given back for layer statistics.
TEST(ResidualTest, ReluAfterTheBlockFusesBitForBit) {
  const Shape sample{3, 6, 6};
  const LayerKind relu = LayerKind::kReLU;
  std::unique_ptr<Sequential> net;
  ASSERT_TRUE(Sequential::Create(sample.ToVector(),
                                 {Residual({Conv(3, 6, 3, 2, 1), Bn2d(6), Simple(relu),
                                            Conv(6, 6, 3, 1, 1), Bn2d(6)},
                                           {Conv(3, 6, 1, 2, 0), Bn2d(6)}),
                                  Simple(relu)},
                                 7, {}, &net)
                  .ok());
  Randomise(&net->layer(0), 30);
  auto same = [](const float* a, const float* b, int64_t n) {
    return std::memcmp(a, b, sizeof(float) * n) == 0;
  };
  for (bool training : {true, false}) {
    SCOPED_TRACE(training ? "training" : "eval");
    ForwardContext ctx;
    ctx.training = training;
    const Tensor x = RandomTensor(sample.WithBatch(3), 31);
    ForwardRecord rec;
    net->Forward(x.view(), ctx, &rec);
    EXPECT_TRUE(rec.cache(0).relu_fused);
    const Tensor dy = RandomTensor(rec.output().shape(), 32);

    Layer& block = net->layer(0);
    Layer& act = net->layer(1);
    Tensor sum, out;
    LayerCache block_cache, act_cache;
    block.Forward(x.view(), &sum, &block_cache, ctx);
    act.Forward(sum.view(), &out, &act_cache, ctx);
    ASSERT_EQ(rec.output().shape(), out.shape());
    EXPECT_TRUE(same(rec.output().data(), out.data(), out.size()));
    Tensor scratch;
    const ConstTensorView recomputed = net->NodeOutput(rec, net->top_node(0), &scratch);
    ASSERT_EQ(recomputed.size(), sum.size());
    EXPECT_TRUE(same(recomputed.data, sum.data(), sum.size()));

    net->ZeroGrad();
    Tensor dx_fused;
    net->Backward(&rec, dy.view(), &dx_fused);
    std::vector<Tensor> grads_fused;
    for (Parameter* p : net->parameters()) grads_fused.push_back(p->grad);
    net->ZeroGrad();
    Tensor g, dx;
    act.Backward(sum.view(), out, dy.view(), act_cache, ctx, &g);
    block.Backward(x.view(), sum, g.view(), block_cache, ctx, &dx);
    ASSERT_EQ(dx.shape(), dx_fused.shape());
    EXPECT_TRUE(same(dx.data(), dx_fused.data(), dx.size()));
    const std::vector<Parameter*> params = net->parameters();
    ASSERT_EQ(params.size(), grads_fused.size());
    for (size_t i = 0; i < params.size(); ++i) {
      EXPECT_TRUE(same(params[i]->grad.data(), grads_fused[i].data(), grads_fused[i].size()))
          << "parameter " << i;
    }
  }
}

TEST(ResidualTest, StateAndParametersFollowTheTorchModule) {
  std::unique_ptr<Sequential> net = BuildBlock(
      Shape{2, 4, 4}, Residual({Conv(2, 4, 3, 2, 1), Bn2d(4)}, {Conv(2, 4, 1, 2, 0), Bn2d(4)}));
  ResidualBlock* block = net->layer(0).AsResidualBlock();
  ASSERT_NE(block, nullptr);
  std::vector<std::string> names;
  for (const StateSlot& s : block->state()) names.push_back(s.name);
  EXPECT_EQ(names, (std::vector<std::string>{
                       "body.0.weight", "body.1.weight", "body.1.bias", "body.1.running_mean",
                       "body.1.running_var", "body.1.num_batches_tracked", "shortcut.0.weight",
                       "shortcut.1.weight", "shortcut.1.bias", "shortcut.1.running_mean",
                       "shortcut.1.running_var", "shortcut.1.num_batches_tracked"}));
  EXPECT_EQ(block->parameters().size(), 6u);
  EXPECT_EQ(block->NumParameters(), 4 * 2 * 9 + 8 + 4 * 2 + 8);
  EXPECT_STREQ(block->kind_name(), "residual");
  EXPECT_TRUE(block->HasTrainableParameters());
  for (auto& layer : block->body()) layer->set_trainable(false);
  EXPECT_TRUE(block->HasTrainableParameters());
  for (auto& layer : block->shortcut()) layer->set_trainable(false);
  EXPECT_FALSE(block->HasTrainableParameters());
}

// Build's own checks, on a block assembled by hand.
TEST(ResidualTest, BuildChecksThatTheBranchesMeet) {
  Shape out;
  ResidualBlock empty;
  EXPECT_EQ(empty.Build(Shape{4}, &out).message(),
            "the body is empty: a residual block needs at least one layer in it");

  ResidualBlock identity;
  identity.Append(ResidualBlock::Branch::kBody, MakeLayer(Simple(LayerKind::kFlatten)),
                  Shape{12});
  const Status s = identity.Build(Shape{3, 2, 2}, &out);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(s.message(),
            "the body produces (12) per sample but the identity shortcut passes on the input's "
            "(3, 2, 2); the two are added, so they must match (give the block a projection "
            "shortcut, e.g. a Conv2d with the body's stride and output channels, and a "
            "BatchNorm2d)");

  ResidualBlock projected;
  projected.Append(ResidualBlock::Branch::kBody, MakeLayer(Simple(LayerKind::kReLU)),
                   Shape{3, 2, 2});
  projected.Append(ResidualBlock::Branch::kShortcut, MakeLayer(Simple(LayerKind::kFlatten)),
                   Shape{12});
  EXPECT_EQ(projected.Build(Shape{3, 2, 2}, &out).message(),
            "the body produces (3, 2, 2) per sample but the shortcut produces (12); the two are "
            "added, so they must match");

  ResidualBlock good;
  good.Append(ResidualBlock::Branch::kBody, MakeLayer(Simple(LayerKind::kReLU)), Shape{3, 2, 2});
  ASSERT_TRUE(good.Build(Shape{3, 2, 2}, &out).ok());
  EXPECT_EQ(out, (Shape{3, 2, 2}));
}

}  // namespace
}  // namespace normd
