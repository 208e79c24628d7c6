// core/model and core/sequential: building, state_dict naming, atomic steps, modes.
#include "core/model.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <set>
#include <string>

namespace normd {
namespace {

LayerConfig LinearLayer(int64_t in, int64_t out) {
  LayerConfig l;
  l.kind = LayerKind::kLinear;
  l.linear.in_features = in;
  l.linear.out_features = out;
  return l;
}
LayerConfig Bn1d(int64_t c) {
  LayerConfig l;
  l.kind = LayerKind::kBatchNorm1d;
  l.batch_norm.num_features = c;
  return l;
}
LayerConfig Relu() {
  LayerConfig l;
  l.kind = LayerKind::kReLU;
  return l;
}

ModelConfig Mlp() {
  ModelConfig c;
  c.input_shape = {6};
  c.layers = {LinearLayer(6, 8), Bn1d(8), Relu(), LinearLayer(8, 3)};
  c.loss = LossKind::kCrossEntropy;
  c.optimizer.kind = OptimizerKind::kSgd;
  c.optimizer.sgd.lr = 0.1f;
  c.optimizer.sgd.momentum = 0.9f;
  c.seed = 42;
  return c;
}

std::unique_ptr<Model> Build(const ModelConfig& c) {
  std::unique_ptr<Model> m;
  Status s = Model::Create(c, Sequential::Limits(), &m);
  EXPECT_TRUE(s.ok()) << s.message();
  return m;
}

Tensor RandomBatch(int64_t n, int64_t f, uint64_t seed, float shift = 0.0f) {
  Rng rng(seed);
  Tensor t(Shape{n, f});
  for (int64_t i = 0; i < t.size(); ++i) t.data()[i] = rng.Uniform(-1.0f, 1.0f) + shift;
  return t;
}

std::vector<int64_t> Labels(int64_t n, int64_t k) {
  std::vector<int64_t> l(n);
  for (int64_t i = 0; i < n; ++i) l[i] = i % k;
  return l;
}

Targets LabelTargets(const std::vector<int64_t>& l) {
  Targets t;
  t.labels = l.data();
  t.num_labels = static_cast<int64_t>(l.size());
  return t;
}

// Bit-exact comparison of two states.
void ExpectSameState(const std::vector<NamedTensor>& a, const std::vector<NamedTensor>& b) {
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(a[i].name, b[i].name);
    EXPECT_EQ(a[i].shape, b[i].shape) << a[i].name;
    ASSERT_EQ(a[i].values.size(), b[i].values.size()) << a[i].name;
    EXPECT_EQ(0, std::memcmp(a[i].values.data(), b[i].values.data(),
                             a[i].values.size() * sizeof(float)))
        << a[i].name;
  }
}

TEST(ModelTest, StateNamesFollowPyTorchSequential) {
  auto m = Build(Mlp());
  std::vector<std::string> names;
  for (const NamedTensor& t : m->GetState(false)) names.push_back(t.name);
  EXPECT_EQ(names, (std::vector<std::string>{"0.weight", "0.bias", "1.weight", "1.bias",
                                             "1.running_mean", "1.running_var",
                                             "1.num_batches_tracked", "3.weight", "3.bias"}));
  EXPECT_EQ(m->net().parameter_count(), 6 * 8 + 8 + 8 + 8 + 8 * 3 + 3);
  for (const NamedTensor& t : m->GetState(false)) {
    if (t.name == "1.num_batches_tracked") {
      EXPECT_EQ(t.shape.rank(), 0);
    }
  }
}

TEST(ModelTest, ArchitectureErrorsNameTheLayer) {
  ModelConfig c = Mlp();
  c.layers[1] = Bn1d(50);
  std::unique_ptr<Model> m;
  Status s = Model::Create(c, Sequential::Limits(), &m);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(s.message(),
            "layer 1 (BatchNorm1d): num_features is 50 but the previous layer produces 8 "
            "features");
  c = Mlp();
  c.layers[0] = LinearLayer(5, 8);
  s = Model::Create(c, Sequential::Limits(), &m);
  EXPECT_NE(s.message().find("layer 0 (Linear): in_features is 5"), std::string::npos);
  c = Mlp();
  c.loss = LossKind::kCrossEntropy;
  c.layers.push_back(LayerConfig());
  c.layers.back().kind = LayerKind::kFlatten;
  c.input_shape = {6};
  EXPECT_TRUE(Model::Create(c, Sequential::Limits(), &m).ok());
}

TEST(ModelTest, ParameterLimitRejectsBeforeAllocating) {
  ModelConfig c = Mlp();
  c.input_shape = {1000000000};
  c.layers = {LinearLayer(1000000000, 1000000000)};
  Sequential::Limits limits;
  limits.max_parameters = 10000000;
  limits.max_sample_elements = int64_t{1} << 40;
  std::unique_ptr<Model> m;
  Status s = Model::Create(c, limits, &m);
  EXPECT_EQ(s.code(), StatusCode::kResourceExhausted) << s.message();
}

TEST(ModelTest, EvalForwardIsRepeatableAndTrainForwardUpdatesRunningStats) {
  auto m = Build(Mlp());
  Tensor x = RandomBatch(16, 6, 1);
  ForwardRecord rec;
  ASSERT_TRUE(m->Forward(x.view(), &rec).ok());  // train mode by default
  EXPECT_EQ(m->net().layer(1).AsBatchNorm()->num_batches_tracked(), 1);
  m->SetMode(false, false);
  const std::vector<NamedTensor> before = m->GetState(true);
  ForwardRecord r1, r2;
  ASSERT_TRUE(m->Forward(x.view(), &r1).ok());
  ASSERT_TRUE(m->Forward(x.view(), &r2).ok());
  ASSERT_EQ(r1.output().size(), r2.output().size());
  EXPECT_EQ(0, std::memcmp(r1.output().data(), r2.output().data(),
                           r1.output().size() * sizeof(float)));
  ExpectSameState(before, m->GetState(true));
}

TEST(ModelTest, FrozenRunningStatsStayFixedWhileTraining) {
  auto m = Build(Mlp());
  m->SetMode(true, true);
  const auto before = m->GetState(false);
  Tensor x = RandomBatch(16, 6, 2, 3.0f);
  std::vector<int64_t> labels = Labels(16, 3);
  ForwardRecord rec;
  TrainResult r;
  ASSERT_TRUE(m->TrainStep(x.view(), LabelTargets(labels), &rec, &r).ok());
  const auto after = m->GetState(false);
  for (size_t i = 0; i < before.size(); ++i) {
    if (before[i].name.find("running") != std::string::npos ||
        before[i].name.find("num_batches") != std::string::npos) {
      EXPECT_EQ(before[i].values, after[i].values) << before[i].name;
    }
  }
  EXPECT_NE(before[0].values, after[0].values);  // weights trained
}

TEST(ModelTest, ForwardBackwardApplyEqualsTrainStep) {
  auto a = Build(Mlp());
  auto b = Build(Mlp());
  std::vector<int64_t> labels = Labels(12, 3);
  for (int step = 0; step < 3; ++step) {
    Tensor x = RandomBatch(12, 6, 10 + step);
    ForwardRecord rec;
    TrainResult r;
    ASSERT_TRUE(a->TrainStep(x.view(), LabelTargets(labels), &rec, &r).ok());

    ForwardRecord frec;
    ASSERT_TRUE(b->Forward(x.view(), &frec).ok());
    Tensor grad;
    const double loss = ComputeLoss(LossKind::kCrossEntropy, frec.output().view(),
                                    LabelTargets(labels), &grad);
    EXPECT_EQ(loss, r.loss);
    ASSERT_TRUE(b->Backward(&frec, grad.view(), nullptr).ok());
    StepResult s;
    ASSERT_TRUE(b->ApplyGradients(&s).ok());
    EXPECT_EQ(s.step, r.step);
    EXPECT_EQ(s.grad_norm, r.grad_norm);
    EXPECT_EQ(s.learning_rate, r.learning_rate);
  }
  ExpectSameState(a->GetState(true), b->GetState(true));
}

TEST(ModelTest, TrainStepStartsFromZeroGradients) {
  // TrainStep skips clearing gradients it knows are zero (Model::grads_zero_): gradients left
  // by a Backward that was never applied, or written through mutable_net(), must still not
  // reach its step. Running statistics frozen, so that a's extra Forward changes nothing else.
  auto a = Build(Mlp());
  auto b = Build(Mlp());
  a->SetMode(true, true);
  b->SetMode(true, true);
  std::vector<int64_t> labels = Labels(12, 3);
  const Tensor x1 = RandomBatch(12, 6, 21), x2 = RandomBatch(12, 6, 22),
               x3 = RandomBatch(12, 6, 23), x4 = RandomBatch(12, 6, 24);
  ForwardRecord rec;
  TrainResult r;
  ASSERT_TRUE(a->TrainStep(x1.view(), LabelTargets(labels), &rec, &r).ok());
  ASSERT_TRUE(b->TrainStep(x1.view(), LabelTargets(labels), &rec, &r).ok());
  // a: a Backward's gradients, never applied.
  ForwardRecord frec;
  ASSERT_TRUE(a->Forward(x2.view(), &frec).ok());
  Tensor dy(Shape{12, 3}, 0.5f);
  ASSERT_TRUE(a->Backward(&frec, dy.view(), nullptr).ok());
  ASSERT_TRUE(a->TrainStep(x3.view(), LabelTargets(labels), &rec, &r).ok());
  ASSERT_TRUE(b->TrainStep(x3.view(), LabelTargets(labels), &rec, &r).ok());
  ExpectSameState(a->GetState(true), b->GetState(true));
  // a: a gradient written in place after the step cleared them.
  a->mutable_net().parameters()[0]->grad.data()[0] = 1e3f;
  ASSERT_TRUE(a->TrainStep(x4.view(), LabelTargets(labels), &rec, &r).ok());
  ASSERT_TRUE(b->TrainStep(x4.view(), LabelTargets(labels), &rec, &r).ok());
  ExpectSameState(a->GetState(true), b->GetState(true));
}

TEST(ModelTest, StaleForwardIsRefused) {
  auto m = Build(Mlp());
  Tensor x = RandomBatch(8, 6, 3);
  ForwardRecord rec;
  ASSERT_TRUE(m->Forward(x.view(), &rec).ok());
  Tensor dy(Shape{8, 3}, 0.1f);
  ASSERT_TRUE(m->Backward(&rec, dy.view(), nullptr).ok());
  StepResult step;
  ASSERT_TRUE(m->ApplyGradients(&step).ok());
  Status s = m->Backward(&rec, dy.view(), nullptr);
  EXPECT_EQ(s.code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(s.message().find("parameters changed"), std::string::npos);

  ForwardRecord rec2;
  ASSERT_TRUE(m->Forward(x.view(), &rec2).ok());
  m->SetMode(false, false);
  s = m->Backward(&rec2, dy.view(), nullptr);
  EXPECT_EQ(s.code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(s.message().find("switched mode"), std::string::npos);
  // A wrong grad_output shape is an argument error.
  ForwardRecord rec3;
  ASSERT_TRUE(m->Forward(x.view(), &rec3).ok());
  Tensor bad(Shape{8, 4}, 0.1f);
  EXPECT_EQ(m->Backward(&rec3, bad.view(), nullptr).code(), StatusCode::kInvalidArgument);
}

TEST(ModelTest, NonFiniteStepLeavesModelBitIdentical) {
  auto m = Build(Mlp());
  std::vector<int64_t> labels = Labels(8, 3);
  ForwardRecord rec;
  TrainResult r;
  ASSERT_TRUE(m->TrainStep(RandomBatch(8, 6, 4).view(), LabelTargets(labels), &rec, &r).ok());
  // Finite but huge weights overflow to Inf inside the network: 6 * 3e38 > FLT_MAX.
  auto huge = m->GetState(false);
  std::fill(huge[0].values.begin(), huge[0].values.end(), 3e38f);
  ASSERT_TRUE(m->SetState({huge[0]}, false).ok());
  const auto before = m->GetState(true);
  const uint64_t step = m->step();
  Tensor x(Shape{8, 6}, 1.0f);
  Status s = m->TrainStep(x.view(), LabelTargets(labels), &rec, &r);
  EXPECT_EQ(s.code(), StatusCode::kFailedPrecondition) << s.message();
  EXPECT_NE(s.message().find("model unchanged"), std::string::npos);
  EXPECT_NE(s.message().find("step 2"), std::string::npos) << s.message();
  EXPECT_EQ(m->step(), step);
  ExpectSameState(before, m->GetState(true));
}

TEST(ModelTest, BadInputsAreRejectedWithoutChanges) {
  auto m = Build(Mlp());
  const auto before = m->GetState(true);
  ForwardRecord rec;
  TrainResult r;
  std::vector<int64_t> labels = Labels(4, 3);
  Tensor wrong(Shape{4, 5});
  EXPECT_EQ(m->TrainStep(wrong.view(), LabelTargets(labels), &rec, &r).code(),
            StatusCode::kInvalidArgument);
  Tensor nan = RandomBatch(4, 6, 6);
  nan.data()[3] = std::numeric_limits<float>::quiet_NaN();
  EXPECT_EQ(m->TrainStep(nan.view(), LabelTargets(labels), &rec, &r).code(),
            StatusCode::kInvalidArgument);
  std::vector<int64_t> out_of_range = {0, 1, 3, 0};
  Status s = m->TrainStep(RandomBatch(4, 6, 7).view(), LabelTargets(out_of_range), &rec, &r);
  EXPECT_EQ(s.message(), "labels[2] = 3 is out of range [0, 3)");
  Tensor one = RandomBatch(1, 6, 8);
  std::vector<int64_t> one_label = {0};
  s = m->TrainStep(one.view(), LabelTargets(one_label), &rec, &r);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("layer 1 (BatchNorm1d): Expected more than 1 value per channel"),
            std::string::npos) << s.message();
  ExpectSameState(before, m->GetState(true));
  EXPECT_EQ(m->step(), 0u);
}

TEST(ModelTest, EvaluateChangesNothingInTrainMode) {
  auto m = Build(Mlp());
  const auto before = m->GetState(true);
  std::vector<int64_t> labels = Labels(10, 3);
  ForwardRecord rec;
  EvalResult r;
  ASSERT_TRUE(m->Evaluate(RandomBatch(10, 6, 9).view(), LabelTargets(labels), &rec, &r).ok());
  EXPECT_GT(r.loss, 0.0);
  EXPECT_GE(r.accuracy, 0.0);
  EXPECT_LE(r.accuracy, 1.0);
  EXPECT_EQ(r.samples, 10);
  ExpectSameState(before, m->GetState(true));
  EXPECT_TRUE(m->training());
}

TEST(ModelTest, SetStateRoundTripsAndValidatesBeforeWriting) {
  auto a = Build(Mlp());
  std::vector<int64_t> labels = Labels(8, 3);
  ForwardRecord rec;
  TrainResult r;
  for (int i = 0; i < 3; ++i) {
    ASSERT_TRUE(a->TrainStep(RandomBatch(8, 6, 20 + i).view(), LabelTargets(labels), &rec, &r)
                    .ok());
  }
  ModelConfig other = Mlp();
  other.seed = 7;
  auto b = Build(other);
  ASSERT_TRUE(b->SetState(a->GetState(true), true).ok());
  ExpectSameState(a->GetState(true), b->GetState(true));
  // Both continue identically (optimizer state came along).
  TrainResult ra, rb;
  Tensor x = RandomBatch(8, 6, 30);
  ASSERT_TRUE(a->TrainStep(x.view(), LabelTargets(labels), &rec, &ra).ok());
  ForwardRecord rec_b;
  ASSERT_TRUE(b->TrainStep(x.view(), LabelTargets(labels), &rec_b, &rb).ok());
  EXPECT_EQ(ra.loss, rb.loss);

  const auto before = b->GetState(true);
  auto bad = a->GetState(false);
  bad.back().shape = Shape{4};  // 3.bias has 3 elements
  bad.back().values.resize(4);
  Status s = b->SetState(bad, false);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("'3.bias' has shape (4) but the model expects (3)"),
            std::string::npos) << s.message();
  auto unknown = a->GetState(false);
  unknown.push_back(NamedTensor{"9.weight", Shape{1}, {1.0f}});
  EXPECT_EQ(b->SetState(unknown, false).code(), StatusCode::kInvalidArgument);
  auto partial = a->GetState(false);
  partial.erase(partial.begin());
  EXPECT_EQ(b->SetState(partial, true).code(), StatusCode::kInvalidArgument);
  auto fractional = a->GetState(false);
  for (NamedTensor& t : fractional) {
    if (t.name == "1.num_batches_tracked") t.values[0] = 1.5f;
  }
  EXPECT_EQ(b->SetState(fractional, false).code(), StatusCode::kInvalidArgument);
  for (const float huge : {9.3e18f, 3.7e19f, std::numeric_limits<float>::infinity()}) {
    auto overflowing = a->GetState(false);  // beyond int64: found by checkpoint_fuzz (UBSan)
    for (NamedTensor& t : overflowing) {
      if (t.name == "1.num_batches_tracked") t.values[0] = huge;
    }
    EXPECT_EQ(b->SetState(overflowing, false).code(), StatusCode::kInvalidArgument) << huge;
  }
  ExpectSameState(before, b->GetState(true));
  EXPECT_TRUE(b->SetState(partial, false).ok());  // non-strict accepts a subset
}

TEST(ModelTest, UpdateOptimizerKeepsState) {
  auto a = Build(Mlp());
  auto b = Build(Mlp());
  std::vector<int64_t> labels = Labels(8, 3);
  ForwardRecord ra, rb;
  TrainResult r;
  Tensor x = RandomBatch(8, 6, 40);
  ASSERT_TRUE(a->TrainStep(x.view(), LabelTargets(labels), &ra, &r).ok());
  ASSERT_TRUE(b->TrainStep(x.view(), LabelTargets(labels), &rb, &r).ok());
  OptimizerConfig same = a->config().optimizer;
  ASSERT_TRUE(a->UpdateOptimizer(same).ok());
  ASSERT_TRUE(a->TrainStep(x.view(), LabelTargets(labels), &ra, &r).ok());
  ASSERT_TRUE(b->TrainStep(x.view(), LabelTargets(labels), &rb, &r).ok());
  ExpectSameState(a->GetState(true), b->GetState(true));
  OptimizerConfig adam;
  adam.kind = OptimizerKind::kAdam;
  EXPECT_EQ(a->UpdateOptimizer(adam).code(), StatusCode::kInvalidArgument);
  OptimizerConfig lr = same;
  lr.sgd.lr = 0.5f;
  ASSERT_TRUE(a->UpdateOptimizer(lr).ok());
  EXPECT_EQ(a->config().optimizer.sgd.lr, 0.5f);
}

// --- The training recipe: schedules, clipping, label smoothing, parameter groups -------------

const NamedTensor* Find(const std::vector<NamedTensor>& state, const std::string& name) {
  for (const NamedTensor& t : state) {
    if (t.name == name) return &t;
  }
  return nullptr;
}

TEST(ModelTest, TrainStepReportsTheGradientNormAndTheRateItUsed) {
  ModelConfig c = Mlp();
  c.optimizer.schedule.decay = LrScheduleConfig::Decay::kStep;
  c.optimizer.schedule.step_size = 2;
  c.optimizer.schedule.gamma = 0.5;
  auto a = Build(c);
  auto b = Build(c);  // the same steps through Forward + Backward, to measure the gradients
  std::vector<int64_t> labels = Labels(8, 3);
  const double want_lr[] = {0.1, 0.1, 0.05, 0.05, 0.025};
  for (int step = 0; step < 5; ++step) {
    EXPECT_DOUBLE_EQ(a->learning_rate(), static_cast<double>(0.1f) * want_lr[step] / 0.1);
    Tensor x = RandomBatch(8, 6, 60 + step);
    ForwardRecord rec;
    TrainResult r;
    ASSERT_TRUE(a->TrainStep(x.view(), LabelTargets(labels), &rec, &r).ok());
    EXPECT_DOUBLE_EQ(r.learning_rate, static_cast<double>(0.1f) * want_lr[step] / 0.1);

    ForwardRecord frec;
    ASSERT_TRUE(b->Forward(x.view(), &frec).ok());
    Tensor grad;
    ComputeLoss(LossKind::kCrossEntropy, frec.output().view(), LabelTargets(labels), &grad);
    ASSERT_TRUE(b->Backward(&frec, grad.view(), nullptr).ok());
    double sq = 0.0;
    for (const Parameter* p : b->mutable_net().parameters()) {
      for (int64_t i = 0; i < p->grad.size(); ++i) sq += double{p->grad.data()[i]} * p->grad.data()[i];
    }
    StepResult applied;
    ASSERT_TRUE(b->ApplyGradients(&applied).ok());
    EXPECT_NEAR(r.grad_norm, std::sqrt(sq), 1e-12 * std::sqrt(sq));
    EXPECT_GT(r.grad_norm, 0.0);
    EXPECT_EQ(applied.grad_norm, r.grad_norm);
  }
  const std::vector<NamedTensor> state = a->GetState(true);
  const NamedTensor* last_epoch = Find(state, "optimizer.lr_scheduler.last_epoch");
  ASSERT_NE(last_epoch, nullptr);
  EXPECT_EQ(last_epoch->shape, Shape());
  EXPECT_EQ(last_epoch->values[0], 5.0f);
  EXPECT_EQ(Find(a->GetState(false), "optimizer.lr_scheduler.last_epoch"), nullptr);
  EXPECT_EQ(Find(Build(Mlp())->GetState(true), "optimizer.lr_scheduler.last_epoch"), nullptr);
}

TEST(ModelTest, ClippingScalesTheStepAndReportsTheNormBeforeIt) {
  ModelConfig c = Mlp();
  c.optimizer.sgd.momentum = 0.0f;  // the step is lr * grad: easy to compare
  auto plain = Build(c);
  c.optimizer.max_grad_norm = 0.05;
  auto clipped = Build(c);
  const std::vector<NamedTensor> before = plain->GetState(false);
  std::vector<int64_t> labels = Labels(8, 3);
  Tensor x = RandomBatch(8, 6, 70);
  ForwardRecord r1, r2;
  TrainResult a, b;
  ASSERT_TRUE(plain->TrainStep(x.view(), LabelTargets(labels), &r1, &a).ok());
  ASSERT_TRUE(clipped->TrainStep(x.view(), LabelTargets(labels), &r2, &b).ok());
  EXPECT_EQ(a.grad_norm, b.grad_norm);  // reported before clipping
  ASSERT_GT(a.grad_norm, 0.05);         // so the clipping bites
  const double coef = 0.05 / (a.grad_norm + 1e-6);
  const std::vector<NamedTensor> pa = plain->GetState(false), pb = clipped->GetState(false);
  for (size_t i = 0; i < before.size(); ++i) {
    if (before[i].name.find("running") != std::string::npos ||
        before[i].name.find("num_batches") != std::string::npos) {
      continue;
    }
    for (size_t j = 0; j < before[i].values.size(); ++j) {
      const double full = pa[i].values[j] - before[i].values[j];
      const double step = pb[i].values[j] - before[i].values[j];
      EXPECT_NEAR(step, full * coef, 1e-7 + 1e-4 * std::abs(full * coef)) << before[i].name;
    }
  }
}

TEST(ModelTest, NoWeightDecayOnNormAndBiasFollowsTheLayerKinds) {
  ModelConfig c = Mlp();
  c.optimizer.sgd = {0.1f, 0.0f, 0.0f, false, 0.5f};
  c.optimizer.no_weight_decay_on_norm_and_bias = true;
  auto m = Build(c);
  const std::vector<NamedTensor> before = m->GetState(false);
  StepResult r;
  ASSERT_TRUE(m->ApplyGradients(&r).ok());  // zero gradients: only weight decay moves anything
  EXPECT_EQ(r.grad_norm, 0.0);
  const std::vector<NamedTensor> after = m->GetState(false);
  for (size_t i = 0; i < before.size(); ++i) {
    const std::string& name = before[i].name;
    const bool decays = name == "0.weight" || name == "3.weight";  // the Linear weights only
    for (size_t j = 0; j < before[i].values.size(); ++j) {
      if (decays) {
        EXPECT_FLOAT_EQ(after[i].values[j], before[i].values[j] * 0.95f) << name;
      } else {
        EXPECT_EQ(after[i].values[j], before[i].values[j]) << name;
      }
    }
  }
}

// Inside residual blocks each layer is judged by its own kind: a nested BatchNorm's weight is
// exempt, a nested Linear's weight is not (the block itself is neither).
TEST(ModelTest, NoWeightDecayOnNormAndBiasReachesIntoResidualBlocks) {
  ModelConfig c = Mlp();
  LayerConfig block;
  block.kind = LayerKind::kResidual;
  block.residual.body = {LinearLayer(8, 8), Bn1d(8), Relu()};
  block.residual.shortcut = {LinearLayer(8, 8), Bn1d(8)};
  c.layers = {LinearLayer(6, 8), block, Bn1d(8), LinearLayer(8, 3)};
  c.optimizer.sgd = {0.1f, 0.0f, 0.0f, false, 0.5f};
  c.optimizer.no_weight_decay_on_norm_and_bias = true;
  auto m = Build(c);
  const std::vector<NamedTensor> before = m->GetState(false);
  StepResult r;
  ASSERT_TRUE(m->ApplyGradients(&r).ok());  // zero gradients: only weight decay moves anything
  const std::vector<NamedTensor> after = m->GetState(false);
  const std::set<std::string> decaying = {"0.weight", "1.body.0.weight", "1.shortcut.0.weight",
                                          "3.weight"};
  int decayed = 0;
  for (size_t i = 0; i < before.size(); ++i) {
    const std::string& name = before[i].name;
    const bool decays = decaying.count(name) > 0;
    decayed += decays;
    for (size_t j = 0; j < before[i].values.size(); ++j) {
      if (decays) {
        EXPECT_FLOAT_EQ(after[i].values[j], before[i].values[j] * 0.95f) << name;
      } else {
        EXPECT_EQ(after[i].values[j], before[i].values[j]) << name;
      }
    }
  }
  EXPECT_EQ(decayed, 4);
}

TEST(ModelTest, ScheduleProgressIsStateThatSetStateRestores) {
  ModelConfig c = Mlp();
  c.optimizer.schedule.decay = LrScheduleConfig::Decay::kCosine;
  c.optimizer.schedule.t_max = 10;
  auto a = Build(c);
  std::vector<int64_t> labels = Labels(8, 3);
  for (int i = 0; i < 3; ++i) {
    ForwardRecord rec;
    TrainResult r;
    ASSERT_TRUE(a->TrainStep(RandomBatch(8, 6, 80 + i).view(), LabelTargets(labels), &rec, &r)
                    .ok());
  }
  auto b = Build(c);
  EXPECT_NE(a->learning_rate(), b->learning_rate());
  ASSERT_TRUE(b->SetState(a->GetState(true), /*strict=*/true).ok());
  EXPECT_EQ(a->learning_rate(), b->learning_rate());
  ExpectSameState(a->GetState(true), b->GetState(true));
  // A bad counter is refused like any other.
  NamedTensor bad{"optimizer.lr_scheduler.last_epoch", Shape(), {2.5f}};
  EXPECT_EQ(b->SetState({bad}, false).code(), StatusCode::kInvalidArgument);
  // A model without a schedule has no such entry.
  auto plain = Build(Mlp());
  const Status s = plain->SetState({NamedTensor{"optimizer.lr_scheduler.last_epoch", Shape(),
                                                {1.0f}}},
                                   false);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
}

TEST(ModelTest, UpdateOptimizerChangesTheScheduleAndRefusesBadOnes) {
  auto m = Build(Mlp());
  EXPECT_DOUBLE_EQ(m->learning_rate(), static_cast<double>(0.1f));
  OptimizerConfig o = m->config().optimizer;
  o.schedule.warmup_steps = 4;
  o.schedule.warmup_start_factor = 0.25;
  ASSERT_TRUE(m->UpdateOptimizer(o).ok());
  EXPECT_DOUBLE_EQ(m->learning_rate(), 0.25 * static_cast<double>(0.1f));
  OptimizerConfig bad = o;
  bad.schedule.decay = LrScheduleConfig::Decay::kCosine;
  bad.schedule.t_max = 0;
  const Status s = m->UpdateOptimizer(bad);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("t_max"), std::string::npos) << s.message();
  EXPECT_EQ(m->config().optimizer.schedule, o.schedule);
  bad = o;
  bad.max_grad_norm = -1.0;
  EXPECT_EQ(m->UpdateOptimizer(bad).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(m->config().optimizer.max_grad_norm, 0.0);
}

TEST(ModelTest, LabelSmoothingIsTheModelsLossInTrainingAndEvaluation) {
  ModelConfig c = Mlp();
  c.label_smoothing = 0.2;
  auto m = Build(c);
  std::vector<int64_t> labels = Labels(8, 3);
  Tensor x = RandomBatch(8, 6, 90);
  ForwardRecord rec;
  EvalResult e;
  ASSERT_TRUE(m->Evaluate(x.view(), LabelTargets(labels), &rec, &e).ok());
  ASSERT_TRUE(m->Predict(x.view(), &rec).ok());
  EXPECT_DOUBLE_EQ(e.loss, ComputeLoss(LossKind::kCrossEntropy, rec.output().view(),
                                       LabelTargets(labels), nullptr, 0.2));

  ModelConfig bad = Mlp();
  bad.label_smoothing = 1.0;
  std::unique_ptr<Model> out;
  EXPECT_EQ(Model::Create(bad, Sequential::Limits(), &out).code(), StatusCode::kInvalidArgument);
  bad.label_smoothing = 0.1;
  bad.loss = LossKind::kMse;
  const Status s = Model::Create(bad, Sequential::Limits(), &out);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("cross-entropy only"), std::string::npos) << s.message();
}

}  // namespace
}  // namespace normd
