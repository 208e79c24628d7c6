// core/sequential's layer tree (residual blocks holding layers, nested): node paths, labels and
// state_dict names, architecture errors naming the nested layer, limits, and every Model
// feature that walks the tree: BatchNorm status and running statistics, CheckInput's
// batch-size rule, per-layer options, AdaptStatistics, small-batch reports, layer statistics,
// ResetRunningStats and FoldBatchNorm.
#include "core/sequential.h"

#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/fold.h"
#include "core/model.h"
#include "tests/core/layer_configs.h"

namespace normd {
namespace {

using testing::Bn2d;
using testing::Conv;
using testing::Linear;
using testing::Residual;
using testing::Simple;

// A small ResNet: stem, an identity BasicBlock, a stride-2 block with a projection shortcut,
// global average pooling, a linear head.
//   0 conv, 1 bn "stem_bn", 2 relu,
//   3 residual {body: 0 conv, 1 bn, 2 relu, 3 conv, 4 bn},
//   4 residual {body: 0 conv s2, 1 bn, 2 relu, 3 conv, 4 bn; shortcut: 0 conv 1x1 s2, 1 bn},
//   5 relu, 6 adaptive avg pool, 7 flatten, 8 linear
ModelConfig ResNet() {
  ModelConfig c;
  c.input_shape = {3, 8, 8};
  c.layers = {Conv(3, 4, 3, 1, 1),
              Bn2d(4, "stem_bn"),
              Simple(LayerKind::kReLU),
              Residual({Conv(4, 4, 3, 1, 1), Bn2d(4), Simple(LayerKind::kReLU),
                        Conv(4, 4, 3, 1, 1), Bn2d(4)}),
              Residual({Conv(4, 8, 3, 2, 1), Bn2d(8), Simple(LayerKind::kReLU),
                        Conv(8, 8, 3, 1, 1), Bn2d(8)},
                       {Conv(4, 8, 1, 2, 0), Bn2d(8)}),
              Simple(LayerKind::kReLU),
              Simple(LayerKind::kAdaptiveAvgPool2d),
              Simple(LayerKind::kFlatten),
              Linear(8, 3)};
  c.loss = LossKind::kCrossEntropy;
  c.optimizer.sgd.lr = 0.1f;
  c.optimizer.sgd.momentum = 0.9f;
  c.seed = 5;
  return c;
}

std::unique_ptr<Model> Build(const ModelConfig& c = ResNet()) {
  std::unique_ptr<Model> m;
  Status s = Model::Create(c, Sequential::Limits(), &m);
  EXPECT_TRUE(s.ok()) << s.message();
  return m;
}

Status CreateError(const ModelConfig& c, const Sequential::Limits& limits = {}) {
  std::unique_ptr<Model> m;
  return Model::Create(c, limits, &m);
}

Tensor Input(int64_t n, float shift = 0.0f, const Shape& sample = Shape{3, 8, 8}) {
  Tensor x(sample.WithBatch(n));
  for (int64_t i = 0; i < x.size(); ++i) x.data()[i] = std::sin(0.37f * i) * 1.5f + shift;
  return x;
}

std::map<std::string, std::vector<float>> State(const Model& m) {
  std::map<std::string, std::vector<float>> out;
  for (const NamedTensor& t : m.GetState(true)) out[t.name] = t.values;
  return out;
}

void Train(Model& m, int steps, float shift = 0.3f) {
  std::vector<int64_t> labels = {0, 1, 2, 0};
  Targets t;
  t.labels = labels.data();
  t.num_labels = 4;
  ForwardRecord rec;
  TrainResult r;
  for (int i = 0; i < steps; ++i) {
    const Tensor x = Input(4, shift * i);
    ASSERT_TRUE(m.TrainStep(x.view(), t, &rec, &r).ok());
  }
}

TEST(SequentialTreeTest, NodesFollowPyTorchsModuleOrder) {
  auto m = Build();
  const Sequential& net = m->net();
  EXPECT_EQ(net.num_layers(), 9);
  ASSERT_EQ(net.num_nodes(), 9 + 5 + 7);
  std::vector<std::string> paths, labels;
  for (const LayerNode& n : net.nodes()) {
    paths.push_back(n.path);
    labels.push_back(n.label);
  }
  EXPECT_EQ(paths, (std::vector<std::string>{
                       "0", "1", "2", "3", "3.body.0", "3.body.1", "3.body.2", "3.body.3",
                       "3.body.4", "4", "4.body.0", "4.body.1", "4.body.2", "4.body.3",
                       "4.body.4", "4.shortcut.0", "4.shortcut.1", "5", "6", "7", "8"}));
  EXPECT_EQ(labels[1], "stem_bn");
  EXPECT_EQ(labels[16], "4.shortcut.1");
  const LayerNode& n = net.node(16);
  EXPECT_EQ(n.description, "layer 4 (residual) shortcut layer 1 (BatchNorm2d)");
  EXPECT_EQ(n.parent, 9);
  EXPECT_EQ(n.previous, 15);
  EXPECT_EQ(n.depth, 1);
  EXPECT_EQ(n.input_shape, (Shape{8, 4, 4}));
  EXPECT_EQ(net.node(9).output_shape, (Shape{8, 4, 4}));
  EXPECT_EQ(net.node(18).output_shape, (Shape{8, 1, 1}));
  EXPECT_EQ(net.top_node(4), 9);
  EXPECT_EQ(net.layer_name(1), "stem_bn");
  EXPECT_EQ(net.layer_name(4), "4");
  EXPECT_EQ(net.FindNode("stem_bn"), 1);
  EXPECT_EQ(net.FindNode("1"), 1);  // a named layer is found by its path too
  EXPECT_EQ(net.FindNode("4.body.3"), 13);
  EXPECT_EQ(net.FindNode("4.body.5"), -1);
  EXPECT_EQ(net.FindNode("04"), -1);
}

TEST(SequentialTreeTest, StateNamesAreTheTorchModulesPaths) {
  auto m = Build();
  std::vector<std::string> names;
  for (const NamedTensor& t : m->GetState(false)) names.push_back(t.name);
  const std::vector<std::string> bn = {"weight", "bias", "running_mean", "running_var",
                                       "num_batches_tracked"};
  std::vector<std::string> want = {"0.weight"};
  for (const std::string& prefix :
       {std::string("1"), std::string("3.body.1"), std::string("3.body.4"),
        std::string("4.body.1"), std::string("4.body.4"), std::string("4.shortcut.1")}) {
    if (prefix == "3.body.1") want.push_back("3.body.0.weight");
    if (prefix == "3.body.4") want.push_back("3.body.3.weight");
    if (prefix == "4.body.1") want.push_back("4.body.0.weight");
    if (prefix == "4.body.4") want.push_back("4.body.3.weight");
    if (prefix == "4.shortcut.1") want.push_back("4.shortcut.0.weight");
    for (const std::string& b : bn) want.push_back(prefix + "." + b);
  }
  want.push_back("8.weight");
  want.push_back("8.bias");
  EXPECT_EQ(names, want);
  // Parameters in the same order, and the optimizer's state named after them.
  std::vector<std::string> params = m->mutable_net().parameter_names();
  EXPECT_EQ(params.front(), "0.weight");
  EXPECT_EQ(params[3], "3.body.0.weight");
  EXPECT_EQ(params.back(), "8.bias");
  EXPECT_EQ(m->mutable_net().parameters().size(), params.size());
  Train(*m, 1);
  EXPECT_EQ(State(*m).count("optimizer.4.shortcut.1.bias.momentum_buffer"), 1u);
  int64_t count = 0;
  for (Parameter* p : m->mutable_net().parameters()) count += p->value.size();
  EXPECT_EQ(m->net().parameter_count(), count);
}

TEST(SequentialTreeTest, ArchitectureErrorsNameTheNestedLayerByItsPath) {
  ModelConfig c = ResNet();
  c.layers[4].residual.body[4] = Bn2d(6);
  Status s = CreateError(c);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(s.message(),
            "layer 4 (residual) body layer 4 (BatchNorm2d): num_features is 6 but the previous "
            "layer produces 8 channels");

  c = ResNet();
  c.layers[4].residual.shortcut[0].conv2d.in_channels = 3;
  EXPECT_EQ(CreateError(c).message(),
            "layer 4 (residual) shortcut layer 0 (Conv2d): in_channels is 3 but the input has 4 "
            "channels");

  c = ResNet();  // no projection: the stride-2 body cannot meet the input
  c.layers[4].residual.shortcut.clear();
  EXPECT_EQ(CreateError(c).message(),
            "layer 4 (residual): the body produces (8, 4, 4) per sample but the identity "
            "shortcut passes on the input's (4, 8, 8); the two are added, so they must match "
            "(give the block a projection shortcut, e.g. a Conv2d with the body's stride and "
            "output channels, and a BatchNorm2d)");

  c = ResNet();  // a projection without the stride
  c.layers[4].residual.shortcut[0].conv2d.stride = 1;
  EXPECT_EQ(CreateError(c).message(),
            "layer 4 (residual): the body produces (8, 4, 4) per sample but the shortcut "
            "produces (8, 8, 8); the two are added, so they must match");

  c = ResNet();
  c.layers[3].residual.body.clear();
  EXPECT_EQ(CreateError(c).message(),
            "layer 3 (residual): the body is empty: a residual block needs at least one layer "
            "in it");

  c = ResNet();  // nested: a block inside a body
  c.layers[3].residual.body[2] = Residual({Simple(LayerKind::kReLU), Bn2d(5)});
  EXPECT_EQ(CreateError(c).message(),
            "layer 3 (residual) body layer 2 (residual) body layer 1 (BatchNorm2d): "
            "num_features is 5 but the previous layer produces 4 channels");

  c = ResNet();
  c.layers[3].residual.body[1].name = "stem_bn";
  EXPECT_EQ(CreateError(c).message(),
            "layer 3 (residual) body layer 1 (BatchNorm2d): name 'stem_bn' is used by another "
            "layer");
}

TEST(SequentialTreeTest, LimitsCountNestedLayersAndDepth) {
  Sequential::Limits limits;
  limits.max_layers = 20;  // the ResNet has 21 layers in its tree
  Status s = CreateError(ResNet(), limits);
  EXPECT_EQ(s.code(), StatusCode::kResourceExhausted);
  EXPECT_EQ(s.message(),
            "layer 8 (Linear): the model would have more than 20 layers (the limit; residual "
            "blocks and the layers inside them count)");
  limits.max_layers = 21;
  EXPECT_TRUE(CreateError(ResNet(), limits).ok());

  ModelConfig c;
  c.input_shape = {4};
  c.loss = LossKind::kMse;
  LayerConfig block = Residual({Simple(LayerKind::kReLU)});
  for (int d = 1; d < kMaxResidualDepth; ++d) block = Residual({block});
  c.layers = {block};
  EXPECT_TRUE(CreateError(c).ok());
  c.layers = {Residual({block})};
  s = CreateError(c);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("residual blocks nest more than 16 deep"), std::string::npos)
      << s.message();
}

TEST(SequentialTreeTest, BatchSizeRuleAppliesInsideBlocks) {
  ModelConfig c;
  c.input_shape = {4, 1, 1};
  c.loss = LossKind::kMse;
  c.layers = {Residual({Simple(LayerKind::kReLU), Bn2d(4)})};
  auto m = Build(c);
  const Tensor x = Input(1, 0.0f, Shape{4, 1, 1});
  Status s = m->CheckInput(x.view(), /*training=*/true);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(s.message(),
            "layer 0 (residual) body layer 1 (BatchNorm2d): Expected more than 1 value per "
            "channel when training, got input size (1, 4, 1, 1)");
  EXPECT_TRUE(m->CheckInput(x.view(), /*training=*/false).ok());
}

TEST(SequentialTreeTest, TrainingUpdatesNestedRunningStatsAndStatus) {
  auto m = Build();
  const auto before = State(*m);
  Train(*m, 3);
  const auto after = State(*m);
  for (const char* bn : {"1", "3.body.1", "3.body.4", "4.body.4", "4.shortcut.1"}) {
    const std::string name = bn;
    EXPECT_EQ(after.at(name + ".num_batches_tracked")[0], 3.0f) << name;
    EXPECT_NE(after.at(name + ".running_mean"), before.at(name + ".running_mean")) << name;
    EXPECT_NE(after.at(name + ".weight"), before.at(name + ".weight")) << name;
  }
  const std::vector<BatchNormStatus> status = m->batch_norm_status();
  ASSERT_EQ(status.size(), 6u);
  std::vector<std::string> names;
  for (const BatchNormStatus& st : status) {
    names.push_back(st.name);
    EXPECT_EQ(st.num_batches_tracked, 3) << st.name;
    EXPECT_GT(st.running_mean_update_norm, 0.0f) << st.name;
    EXPECT_GT(st.last_var_log_ratio, 0.0f) << st.name;
  }
  EXPECT_EQ(names, (std::vector<std::string>{"stem_bn", "3.body.1", "3.body.4", "4.body.1",
                                             "4.body.4", "4.shortcut.1"}));
  EXPECT_EQ(status[5].layer, 16);

  m->ResetRunningStats();
  const auto reset = State(*m);
  EXPECT_EQ(reset.at("4.shortcut.1.num_batches_tracked")[0], 0.0f);
  EXPECT_EQ(reset.at("3.body.4.running_var"), std::vector<float>(4, 1.0f));
}

TEST(SequentialTreeTest, SmallBatchReportsAndLayerStatsReachNestedLayers) {
  auto m = Build();
  const Tensor x = Input(2);
  ForwardRecord rec;
  ASSERT_TRUE(m->Forward(x.view(), &rec).ok());
  // 2 samples of 4x4 values per channel after the stride-2 block: 32 < 40.
  std::vector<SmallBatchReport> small = m->SmallBatches(rec, 40);
  std::vector<std::string> names;
  for (const SmallBatchReport& r : small) names.push_back(r.name);
  EXPECT_EQ(names, (std::vector<std::string>{"4.body.1", "4.body.4", "4.shortcut.1"}));
  EXPECT_EQ(small[0].values_per_channel, 32);

  const std::vector<LayerActivationStats> stats = m->net().ActivationStats(rec);
  ASSERT_EQ(static_cast<int>(stats.size()), m->net().num_nodes());
  // A nested layer's input is the previous one's output; a branch's first layer reads the
  // block's input; the block's output is body + shortcut, which is what layer 5 reads.
  EXPECT_EQ(stats[12].input.mean, stats[11].output.mean);
  EXPECT_EQ(stats[15].input.mean, stats[9].input.mean);
  EXPECT_EQ(stats[10].input.mean, stats[3].output.mean);
  EXPECT_EQ(stats[17].input.mean, stats[9].output.mean);
  EXPECT_EQ(stats[17].input.std, stats[9].output.std);
}

// A data-parallel job reports the whole batch's layer statistics by combining every shard's
// ActivationMoments (CombineMoments, in row order). In eval mode a shard's rows go through the
// model exactly as in the whole batch, so the combined moments must equal the whole batch's.
TEST(SequentialTreeTest, ActivationMomentsOfShardsCombineIntoTheWholeBatchs) {
  auto m = Build();
  Train(*m, 2);
  m->SetMode(/*training=*/false, /*freeze_running_stats=*/false);
  const Tensor x = Input(5, 0.2f);
  ForwardRecord whole;
  ASSERT_TRUE(m->Forward(x.view(), &whole).ok());
  const std::vector<LayerActivationStats> want = m->net().ActivationStats(whole);
  ASSERT_EQ(static_cast<int>(want.size()), m->net().num_nodes());

  // ActivationStats is MeanStdOf of the moments, bit for bit.
  const std::vector<LayerActivationMoments> moments = m->net().ActivationMoments(whole);
  ASSERT_EQ(moments.size(), want.size());
  for (size_t i = 0; i < want.size(); ++i) {
    EXPECT_EQ(moments[i].layer, want[i].layer);
    EXPECT_EQ(MeanStdOf(moments[i].input).mean, want[i].input.mean) << i;
    EXPECT_EQ(MeanStdOf(moments[i].output).std, want[i].output.std) << i;
  }

  // Rows [0, 2) then [2, 5), merged into empty moments as a job's rank with no rows would.
  const int64_t per_row = x.size() / 5;
  std::vector<LayerActivationMoments> combined(want.size());
  for (LayerActivationMoments& c : combined) c.input = c.output = ChannelMoments{0, {0.0}, {0.0}};
  for (const auto& [begin, rows] : std::vector<std::pair<int64_t, int64_t>>{{0, 2}, {2, 3}}) {
    const ConstTensorView shard{x.data() + begin * per_row, Shape{3, 8, 8}.WithBatch(rows)};
    ForwardRecord rec;
    ASSERT_TRUE(m->Forward(shard, &rec).ok());
    const std::vector<LayerActivationMoments> part = m->net().ActivationMoments(rec);
    for (size_t i = 0; i < combined.size(); ++i) {
      CombineMoments(&combined[i].input, part[i].input);
      CombineMoments(&combined[i].output, part[i].output);
    }
  }
  for (size_t i = 0; i < want.size(); ++i) {
    EXPECT_EQ(combined[i].input.count, moments[i].input.count) << i;
    const MeanStd in = MeanStdOf(combined[i].input);
    const MeanStd out = MeanStdOf(combined[i].output);
    const double scale = 1e-12 * (1.0 + std::abs(want[i].output.mean) + want[i].output.std);
    EXPECT_NEAR(in.mean, want[i].input.mean, 1e-12 * (1.0 + std::abs(want[i].input.mean))) << i;
    EXPECT_NEAR(in.std, want[i].input.std, 1e-12 * (1.0 + want[i].input.std)) << i;
    EXPECT_NEAR(out.mean, want[i].output.mean, scale) << i;
    EXPECT_NEAR(out.std, want[i].output.std, scale) << i;
    EXPECT_GT(out.std, 0.0) << i;
  }
}

TEST(SequentialTreeTest, LayerOptionsNameNestedLayersAndWholeBlocks) {
  auto m = Build();
  bool changed = false;
  ASSERT_TRUE(m->SetLayerOptions({{"4.shortcut.1", true, std::nullopt},
                                  {"3", std::nullopt, false}},
                                 &changed)
                  .ok());
  EXPECT_TRUE(changed);
  std::map<std::string, LayerOptionsStatus> options;
  for (const LayerOptionsStatus& o : m->layer_options()) options[o.name] = o;
  EXPECT_EQ(options.count("3"), 0u);  // a block reports its layers' options, not its own
  EXPECT_TRUE(options.at("4.shortcut.1").frozen);
  for (const char* inner : {"3.body.0", "3.body.1", "3.body.3", "3.body.4"}) {
    EXPECT_FALSE(options.at(inner).trainable) << inner;
  }
  EXPECT_TRUE(options.at("4.body.0").trainable);
  const auto before = State(*m);
  Train(*m, 2);
  const auto after = State(*m);
  EXPECT_EQ(after.at("3.body.0.weight"), before.at("3.body.0.weight"));
  EXPECT_EQ(after.at("3.body.4.bias"), before.at("3.body.4.bias"));
  EXPECT_NE(after.at("3.body.4.running_mean"), before.at("3.body.4.running_mean"));
  EXPECT_NE(after.at("4.body.0.weight"), before.at("4.body.0.weight"));
  EXPECT_EQ(after.at("4.shortcut.1.running_mean"), before.at("4.shortcut.1.running_mean"));
  EXPECT_EQ(after.at("4.shortcut.1.num_batches_tracked")[0], 0.0f);
  EXPECT_NE(after.at("4.shortcut.1.weight"), before.at("4.shortcut.1.weight"));

  // Freezing a block freezes its BatchNorms and leaves its convolutions alone.
  ASSERT_TRUE(m->SetLayerOptions({{"4", true, std::nullopt}}, &changed).ok());
  for (const LayerOptionsStatus& o : m->layer_options()) {
    const bool inside = o.name.rfind("4.", 0) == 0;
    const bool is_bn = m->net().node(o.layer).layer->AsBatchNorm() != nullptr;
    EXPECT_EQ(o.frozen, inside && is_bn) << o.name;
  }
  Status s = m->SetLayerOptions({{"4.body.7", std::nullopt, false}}, &changed);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("the model has no layer '4.body.7'"), std::string::npos);
  ModelConfig c = ResNet();
  c.layers.insert(c.layers.begin() + 3, Residual({Simple(LayerKind::kReLU)}));
  auto plain = Build(c);
  s = plain->SetLayerOptions({{"3", true, std::nullopt}}, &changed);
  EXPECT_EQ(s.message(),
            "layers[0]: layer '3' (residual) holds no layer with parameters or running "
            "statistics");
}

TEST(SequentialTreeTest, AdaptStatisticsPoolsNestedBatchNormInputs) {
  auto m = Build();
  Train(*m, 2);
  bool changed = false;
  ASSERT_TRUE(m->SetLayerOptions({{"3.body.1", true, std::nullopt}}, &changed).ok());
  const auto before = State(*m);
  StatisticsAccumulator acc;
  const Tensor a = Input(4, 1.0f), b = Input(4, -0.5f);
  ASSERT_TRUE(m->AccumulateStatistics(a.view(), &acc).ok());
  ASSERT_TRUE(m->AccumulateStatistics(b.view(), &acc).ok());
  EXPECT_EQ(acc.layers, (std::vector<int>{1, 8, 11, 14, 16}));  // 3.body.1 is frozen
  ASSERT_TRUE(m->CommitStatistics(acc).ok());
  const auto after = State(*m);
  EXPECT_EQ(after.at("3.body.1.running_mean"), before.at("3.body.1.running_mean"));
  EXPECT_EQ(after.at("4.shortcut.1.num_batches_tracked")[0], 4.0f);

  // The shortcut's BatchNorm saw the 1x1 projection of the block input, in both batches.
  ForwardRecord rec;
  ForwardContext ctx;
  ctx.training = true;
  ctx.adapting = true;
  double sum = 0.0;
  int64_t count = 0;
  Tensor scratch;
  for (const Tensor* x : {&a, &b}) {
    m->net().Forward(x->view(), ctx, &rec);
    const ConstTensorView in = m->net().NodeInput(rec, 16, &scratch);
    for (int64_t i = 0; i < in.size(); ++i) {
      if ((i / 16) % 8 == 2) {  // channel 2 of (N, 8, 4, 4)
        sum += in.data[i];
        ++count;
      }
    }
  }
  EXPECT_NEAR(after.at("4.shortcut.1.running_mean")[2], sum / count, 1e-5);
}

TEST(SequentialTreeTest, FoldMergesBatchNormsInsideBranches) {
  auto m = Build();
  Train(*m, 4);
  m->SetMode(false, false);
  FoldedModel f;
  FoldBatchNorm(*m, &f);
  // Every BatchNorm follows a Conv2d: all six fold.
  ASSERT_EQ(f.config.layers.size(), 8u);
  EXPECT_EQ(f.layers.source_layer, (std::vector<int>{0, 2, 3, 4, 5, 6, 7, 8}));
  EXPECT_EQ(f.layers.folded_batch_norm, (std::vector<int>{1, -1, -1, -1, -1, -1, -1, -1}));
  const ResidualConfig& block = f.config.layers[3].residual;
  ASSERT_EQ(block.body.size(), 3u);
  ASSERT_EQ(block.shortcut.size(), 1u);
  EXPECT_TRUE(block.shortcut[0].conv2d.bias);
  EXPECT_EQ(f.layers.body[3].source_layer, (std::vector<int>{0, 2, 3}));
  EXPECT_EQ(f.layers.body[3].folded_batch_norm, (std::vector<int>{1, -1, 4}));
  EXPECT_EQ(f.layers.shortcut[3].folded_batch_norm, (std::vector<int>{1}));
  EXPECT_EQ(NumFoldedBatchNorms(f.layers), 6);
  auto copy = Build(f.config);
  ASSERT_TRUE(copy->SetState(f.state, true).ok());
  std::vector<std::string> names;
  for (const NamedTensor& t : copy->GetState(false)) names.push_back(t.name);
  EXPECT_EQ(names[2], "2.body.0.weight");
  EXPECT_EQ(names.back(), "7.bias");
  EXPECT_TRUE(copy->batch_norm_status().empty());
  const Tensor x = Input(5, 0.4f);
  ForwardRecord a, b;
  ASSERT_TRUE(m->Predict(x.view(), &a).ok());
  ASSERT_TRUE(copy->Predict(x.view(), &b).ok());
  for (int64_t i = 0; i < a.output().size(); ++i) {
    EXPECT_NEAR(a.output().data()[i], b.output().data()[i], 1e-5) << i;
  }
}

TEST(SequentialTreeTest, NonFiniteGradientsNameTheNestedLayer) {
  auto m = Build();
  ForwardRecord rec;
  const Tensor x = Input(4);
  ASSERT_TRUE(m->Forward(x.view(), &rec).ok());
  std::vector<float> dy(12, 1.0f);
  ASSERT_TRUE(m->Backward(&rec, ConstTensorView{dy.data(), Shape{4, 3}}, nullptr).ok());
  m->mutable_net().node(15).layer->parameters()[0]->grad.data()[0] = std::nanf("");
  StepResult step;
  const Status s = m->ApplyGradients(&step);
  EXPECT_EQ(s.code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(s.message(),
            "step 1 produced non-finite gradients in layer 4 (residual) shortcut layer 0 "
            "(Conv2d); model unchanged, accumulated gradients discarded");
}

}  // namespace
}  // namespace normd
