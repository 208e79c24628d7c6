// Per-layer options (Model::SetLayerOptions) and BatchNorm folding (core/fold.h): validation
// that changes nothing, frozen BatchNorm equal to eval semantics, untrainable layers left alone
// by the backward and the optimizer, and the folded copy's eval output. PyTorch parity of the
// same behaviour is in tests/parity/freeze_fold_parity.py.
#include <gtest/gtest.h>

#include <cmath>
#include <map>

#include "core/fold.h"
#include "core/model.h"

namespace normd {
namespace {

LayerConfig Layer(LayerKind kind, int64_t a = 0, int64_t b = 0) {
  LayerConfig l;
  l.kind = kind;
  l.linear.in_features = a;
  l.linear.out_features = b;
  l.batch_norm.num_features = a;
  return l;
}

ModelConfig Mlp() {
  ModelConfig c;
  c.input_shape = {6};
  c.layers = {Layer(LayerKind::kLinear, 6, 8), Layer(LayerKind::kBatchNorm1d, 8),
              Layer(LayerKind::kReLU), Layer(LayerKind::kLinear, 8, 3)};
  c.layers[1].name = "bn";
  c.loss = LossKind::kCrossEntropy;
  c.optimizer.sgd.lr = 0.1f;
  c.optimizer.sgd.momentum = 0.9f;
  c.optimizer.sgd.weight_decay = 0.01f;
  c.seed = 3;
  return c;
}

std::unique_ptr<Model> Build(const ModelConfig& c = Mlp()) {
  std::unique_ptr<Model> m;
  Status s = Model::Create(c, Sequential::Limits(), &m);
  EXPECT_TRUE(s.ok()) << s.message();
  return m;
}

std::vector<float> Input(int64_t n, int64_t f, float shift) {
  std::vector<float> x(n * f);
  for (size_t i = 0; i < x.size(); ++i) x[i] = std::sin(0.7f * i) * 2.0f + shift;
  return x;
}

std::map<std::string, std::vector<float>> State(const Model& m) {
  std::map<std::string, std::vector<float>> out;
  for (const NamedTensor& t : m.GetState(true)) out[t.name] = t.values;
  return out;
}

void Train(Model& m, int steps, float shift = 0.5f) {
  std::vector<int64_t> labels = {0, 1, 2, 0, 1, 2, 0, 1};
  Targets t;
  t.labels = labels.data();
  t.num_labels = 8;
  ForwardRecord rec;
  for (int i = 0; i < steps; ++i) {
    std::vector<float> x = Input(8, 6, shift + i * 0.1f);
    TrainResult r;
    ASSERT_TRUE(m.TrainStep(ConstTensorView{x.data(), Shape{8, 6}}, t, &rec, &r).ok());
  }
}

TEST(LayerOptionsTest, ValidatesEverythingBeforeChangingAnything) {
  auto m = Build();
  bool changed = false;
  Status s = m->SetLayerOptions({{"bn", true, std::nullopt}, {"0", std::nullopt, false},
                                 {"9", std::nullopt, false}},
                                &changed);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("layers[2]"), std::string::npos) << s.message();
  EXPECT_FALSE(changed);
  for (const LayerOptionsStatus& o : m->layer_options()) {
    EXPECT_FALSE(o.frozen);
    EXPECT_TRUE(o.trainable);
  }
  s = m->SetLayerOptions({{"0", true, std::nullopt}}, &changed);
  EXPECT_NE(s.message().find("(Linear) cannot be frozen"), std::string::npos) << s.message();
  s = m->SetLayerOptions({{"2", std::nullopt, false}}, &changed);
  EXPECT_NE(s.message().find("(ReLU) has neither"), std::string::npos) << s.message();
  EXPECT_EQ(m->FindLayer("1"), 1);
  EXPECT_EQ(m->FindLayer("bn"), 1);
  EXPECT_EQ(m->FindLayer("01"), -1);
  EXPECT_EQ(m->FindLayer(""), -1);
  EXPECT_EQ(m->layer_options().size(), 3u);  // Linear, BatchNorm, Linear
}

TEST(LayerOptionsTest, FrozenBatchNormIsEvalSemanticsInTrainMode) {
  auto frozen = Build();
  auto eval = Build();
  bool changed = false;
  ASSERT_TRUE(frozen->SetLayerOptions({{"bn", true, std::nullopt}}, &changed).ok());
  EXPECT_TRUE(changed);
  eval->SetMode(false, false);
  std::vector<float> x = Input(1, 6, 0.3f);  // one sample: fine when frozen
  const ConstTensorView v{x.data(), Shape{1, 6}};
  ForwardRecord a, b;
  ASSERT_TRUE(frozen->Forward(v, &a).ok());
  ASSERT_TRUE(eval->Forward(v, &b).ok());
  ASSERT_EQ(a.output().size(), b.output().size());
  for (int64_t i = 0; i < a.output().size(); ++i) {
    EXPECT_EQ(a.output().data()[i], b.output().data()[i]);
  }
  const auto before = State(*frozen);
  Train(*frozen, 3);
  const auto after = State(*frozen);
  EXPECT_EQ(before.at("1.running_mean"), after.at("1.running_mean"));
  EXPECT_EQ(before.at("1.running_var"), after.at("1.running_var"));
  EXPECT_EQ(after.at("1.num_batches_tracked")[0], 0.0f);
  EXPECT_NE(before.at("1.weight"), after.at("1.weight"));  // still trainable
}

TEST(LayerOptionsTest, UntrainableLayerGetsNoGradientUpdateOrDecay) {
  auto m = Build();
  bool changed = false;
  ASSERT_TRUE(m->SetLayerOptions({{"3", std::nullopt, false}}, &changed).ok());
  EXPECT_FALSE(changed);
  const auto before = State(*m);
  Train(*m, 3);
  const auto after = State(*m);
  for (const char* name : {"3.weight", "3.bias", "optimizer.3.weight.momentum_buffer",
                           "optimizer.3.weight.step"}) {
    EXPECT_EQ(before.at(name), after.at(name)) << name;
  }
  EXPECT_NE(before.at("0.weight"), after.at("0.weight"));
  for (Parameter* p : m->mutable_net().layer(3).parameters()) {
    for (int64_t i = 0; i < p->grad.size(); ++i) ASSERT_EQ(p->grad.data()[i], 0.0f);
  }
  // Input gradients still flow through it.
  std::vector<float> x = Input(4, 6, 0.0f);
  ForwardRecord rec;
  ASSERT_TRUE(m->Forward(ConstTensorView{x.data(), Shape{4, 6}}, &rec).ok());
  std::vector<float> dy(4 * 3, 1.0f);
  dy[0] = -2.0f;
  Tensor dx;
  ASSERT_TRUE(m->Backward(&rec, ConstTensorView{dy.data(), Shape{4, 3}}, &dx).ok());
  float norm = 0.0f;
  for (int64_t i = 0; i < dx.size(); ++i) norm += std::fabs(dx.data()[i]);
  EXPECT_GT(norm, 0.0f);
}

TEST(LayerOptionsTest, FreezingMakesRetainedForwardsStale) {
  auto m = Build();
  std::vector<float> x = Input(4, 6, 0.0f);
  ForwardRecord rec;
  ASSERT_TRUE(m->Forward(ConstTensorView{x.data(), Shape{4, 6}}, &rec).ok());
  bool changed = false;
  ASSERT_TRUE(m->SetLayerOptions({{"bn", true, std::nullopt}}, &changed).ok());
  std::vector<float> dy(12, 1.0f);
  EXPECT_EQ(m->Backward(&rec, ConstTensorView{dy.data(), Shape{4, 3}}, nullptr).code(),
            StatusCode::kFailedPrecondition);
}

TEST(FoldTest, FoldedCopyMatchesEvalOutput) {
  ModelConfig c = Mlp();
  c.layers[0].linear.bias = false;
  c.layers.push_back(Layer(LayerKind::kBatchNorm1d, 3));
  c.layers.back().batch_norm.affine = false;
  auto m = Build(c);
  Train(*m, 4);
  m->SetMode(false, false);
  FoldedModel f;
  FoldBatchNorm(*m, &f);
  ASSERT_EQ(f.config.layers.size(), 3u);
  EXPECT_TRUE(f.config.layers[0].linear.bias);
  EXPECT_EQ(f.layers.source_layer, (std::vector<int>{0, 2, 3}));
  EXPECT_EQ(f.layers.folded_batch_norm, (std::vector<int>{1, -1, 4}));
  auto copy = Build(f.config);
  ASSERT_TRUE(copy->SetState(f.state, true).ok());
  std::vector<float> x = Input(16, 6, 1.0f);
  const ConstTensorView v{x.data(), Shape{16, 6}};
  ForwardRecord a, b;
  ASSERT_TRUE(m->Predict(v, &a).ok());
  ASSERT_TRUE(copy->Predict(v, &b).ok());
  for (int64_t i = 0; i < a.output().size(); ++i) {
    EXPECT_NEAR(a.output().data()[i], b.output().data()[i], 1e-5);
  }
}

TEST(FoldTest, InferenceOnlyRefusesTraining) {
  auto m = Build();
  m->SetMode(false, false);
  m->set_inference_only();
  EXPECT_EQ(m->CheckCanTrain("x").code(), StatusCode::kFailedPrecondition);
  StepResult step;
  EXPECT_EQ(m->ApplyGradients(&step).code(), StatusCode::kFailedPrecondition);
  bool changed = false;
  EXPECT_EQ(m->SetLayerOptions({}, &changed).code(), StatusCode::kFailedPrecondition);
}

}  // namespace
}  // namespace normd
