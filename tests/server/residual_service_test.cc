// Residual networks through the real normd over gRPC: CreateModel's errors name a nested layer
// by its path, GetState/SetState use the torch module's state_dict names, and the Model message,
// layer statistics, per-layer options, /metrics and FoldBatchNorm carry nested layers' labels.
#include <gtest/gtest.h>

#include <signal.h>
#include <stdlib.h>

#include <cmath>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "tests/server/normd_process.h"

namespace normd::testing {
namespace {

using grpc::StatusCode;

v1::LayerSpec Conv(int64_t cin, int64_t cout, int64_t k, int64_t stride = 1, int64_t pad = 0,
                   int64_t groups = 1) {
  v1::LayerSpec l;
  v1::Conv2dSpec* c = l.mutable_conv2d();
  c->set_in_channels(cin);
  c->set_out_channels(cout);
  c->set_kernel_size(k);
  c->set_stride(stride);
  c->set_padding(pad);
  c->set_bias(false);
  if (groups != 1) c->set_groups(groups);
  return l;
}
v1::LayerSpec Bn(int64_t c, const std::string& name = "") {
  v1::LayerSpec l;
  l.set_name(name);
  l.mutable_batch_norm2d()->set_num_features(c);
  return l;
}
v1::LayerSpec Relu() {
  v1::LayerSpec l;
  l.mutable_relu();
  return l;
}

// input (3, 8, 8):
//   0 conv 3->8, 1 bn, 2 relu,
//   3 residual {body: conv 3x3 depthwise (groups 8), bn, relu, conv 1x1, bn "b3_bn2"},
//   4 residual {body: conv s2 8->16, bn, relu, conv, bn; shortcut: conv 1x1 s2, bn},
//   5 relu, 6 adaptive avg pool, 7 flatten, 8 linear 16->5
v1::ModelSpec ResNetSpec() {
  v1::ModelSpec spec;
  for (int64_t d : {3, 8, 8}) spec.add_input_shape(d);
  *spec.add_layers() = Conv(3, 8, 3, 1, 1);
  *spec.add_layers() = Bn(8);
  *spec.add_layers() = Relu();
  v1::ResidualSpec* b3 = spec.add_layers()->mutable_residual();
  for (const v1::LayerSpec& l :
       {Conv(8, 8, 3, 1, 1, 8), Bn(8), Relu(), Conv(8, 8, 1), Bn(8, "b3_bn2")}) {
    *b3->add_body() = l;
  }
  v1::ResidualSpec* b4 = spec.add_layers()->mutable_residual();
  for (const v1::LayerSpec& l : {Conv(8, 16, 3, 2, 1), Bn(16), Relu(), Conv(16, 16, 3, 1, 1),
                                 Bn(16)}) {
    *b4->add_body() = l;
  }
  *b4->add_shortcut() = Conv(8, 16, 1, 2, 0);
  *b4->add_shortcut() = Bn(16);
  *spec.add_layers() = Relu();
  spec.add_layers()->mutable_adaptive_avg_pool2d();
  spec.add_layers()->mutable_flatten();
  v1::LinearSpec* head = spec.add_layers()->mutable_linear();
  head->set_in_features(16);
  head->set_out_features(5);
  spec.set_loss(v1::LOSS_CROSS_ENTROPY);
  spec.mutable_optimizer()->mutable_sgd()->set_lr(0.05f);
  spec.mutable_optimizer()->mutable_sgd()->set_momentum(0.9f);
  spec.set_seed(11);
  return spec;
}

// The model's state (with the optimizer's when `optimizer`); a failed call fails the test and
// gives an empty state.
v1::ModelState GetState(v1::Trainer::Stub* stub, const std::string& id, bool optimizer) {
  v1::GetStateRequest req;
  req.set_model(id);
  req.set_include_optimizer(optimizer);
  v1::ModelState st;
  grpc::Status s = stub->GetState(Ctx().get(), req, &st);
  EXPECT_TRUE(s.ok()) << s.error_message();
  return st;
}

class ResidualServiceTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    std::string error;
    server_ = NormdProcess::Start({"--small-batch-threshold=40"}, &error).release();
    ASSERT_NE(server_, nullptr) << error;
  }
  static void TearDownTestSuite() {
    delete server_;
    server_ = nullptr;
  }
  void SetUp() override {
    ASSERT_NE(server_, nullptr);
    stub_ = server_->NewStub();
  }

  grpc::Status Create(const std::string& id, const v1::ModelSpec& spec, v1::Model* out = nullptr) {
    v1::CreateModelRequest req;
    req.set_id(id);
    *req.mutable_spec() = spec;
    v1::Model ignored;
    return stub_->CreateModel(Ctx().get(), req, out != nullptr ? out : &ignored);
  }

  v1::ModelState GetState(const std::string& id, bool optimizer = false) {
    return testing::GetState(stub_.get(), id, optimizer);
  }

  v1::Model Get(const std::string& id) {
    v1::GetModelRequest req;
    req.set_model(id);
    v1::Model m;
    EXPECT_TRUE(stub_->GetModel(Ctx().get(), req, &m).ok());
    return m;
  }

  grpc::Status TrainStep(const std::string& id, int n, uint64_t seed,
                         v1::TrainStepResponse* resp) {
    v1::TrainStepRequest req;
    req.set_model(id);
    *req.mutable_input() = MakeTensor({n, 3, 8, 8}, RandomValues(n * 192, seed, 1.5f, 0.2f));
    for (int64_t l : RandomLabels(n, 5, seed)) req.add_labels(l);
    return stub_->TrainStep(Ctx().get(), req, resp);
  }

  static NormdProcess* server_;
  std::unique_ptr<v1::Trainer::Stub> stub_;
};

NormdProcess* ResidualServiceTest::server_ = nullptr;

TEST_F(ResidualServiceTest, BadNestedSpecsNameTheLayerByItsPath) {
  v1::ModelSpec spec = ResNetSpec();
  spec.mutable_layers(4)->mutable_residual()->mutable_body(3)->mutable_conv2d()->set_out_channels(
      12);
  grpc::Status s = Create("bad-1", spec);
  EXPECT_EQ(s.error_code(), StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(s.error_message(),
            "spec: layer 4 (residual) body layer 4 (BatchNorm2d): num_features is 16 but the "
            "previous layer produces 12 channels");

  spec = ResNetSpec();
  spec.mutable_layers(4)->mutable_residual()->clear_shortcut();
  s = Create("bad-2", spec);
  EXPECT_EQ(s.error_code(), StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(s.error_message().find("layer 4 (residual): the body produces (16, 4, 4) per sample "
                                   "but the identity shortcut passes on the input's (8, 8, 8)"),
            std::string::npos)
      << s.error_message();

  spec = ResNetSpec();
  spec.mutable_layers(3)->mutable_residual()->mutable_body(0)->mutable_conv2d()->set_groups(3);
  s = Create("bad-3", spec);
  EXPECT_EQ(s.error_code(), StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(s.error_message().find("spec.layers[3].residual.body[0].conv2d.in_channels (8) and "),
            std::string::npos)
      << s.error_message();

  v1::ListModelsResponse list;
  ASSERT_TRUE(stub_->ListModels(Ctx().get(), v1::ListModelsRequest(), &list).ok());
  for (const v1::Model& m : list.models()) EXPECT_NE(m.id().rfind("bad-", 0), 0u) << m.id();
}

TEST_F(ResidualServiceTest, StateNamesFollowTheTorchModule) {
  v1::Model m;
  ASSERT_TRUE(Create("names", ResNetSpec(), &m).ok());
  EXPECT_EQ(m.parameter_count(),
            3 * 8 * 9 + 16 + (8 * 9 + 16 + 64 + 16) + (8 * 16 * 9 + 32 + 16 * 16 * 9 + 32) +
                (8 * 16 + 32) + 16 * 5 + 5);
  const v1::ModelState st = GetState("names");
  std::vector<std::string> names;
  for (const v1::NamedTensor& t : st.tensors()) names.push_back(t.name());
  const std::vector<std::string> want_start = {
      "0.weight", "1.weight", "1.bias", "1.running_mean", "1.running_var",
      "1.num_batches_tracked", "3.body.0.weight", "3.body.1.weight"};
  ASSERT_EQ(names.size(), 1u + 5 + (1 + 5 + 1 + 5) + (1 + 5 + 1 + 5) + (1 + 5) + 2);
  EXPECT_EQ(std::vector<std::string>(names.begin(), names.begin() + want_start.size()),
            want_start);
  const std::vector<std::string> want_end = {
      "4.shortcut.0.weight", "4.shortcut.1.weight", "4.shortcut.1.bias",
      "4.shortcut.1.running_mean", "4.shortcut.1.running_var",
      "4.shortcut.1.num_batches_tracked", "8.weight", "8.bias"};
  EXPECT_EQ(std::vector<std::string>(names.end() - want_end.size(), names.end()), want_end);
  const auto values = StateMap(st);
  EXPECT_EQ(values.at("3.body.0.weight").size(), 8u * 1 * 9);  // depthwise: (8, 1, 3, 3)

  // SetState by those names; an unknown nested name is refused.
  v1::SetStateRequest set;
  set.set_model("names");
  v1::NamedTensor* e = set.mutable_state()->add_tensors();
  e->set_name("4.shortcut.1.running_var");
  *e->mutable_tensor() = MakeTensor({16}, std::vector<float>(16, 2.5f));
  v1::Model out;
  ASSERT_TRUE(stub_->SetState(Ctx().get(), set, &out).ok());
  EXPECT_EQ(StateMap(GetState("names")).at("4.shortcut.1.running_var"),
            std::vector<float>(16, 2.5f));
  e->set_name("4.shortcut.2.running_var");
  grpc::Status s = stub_->SetState(Ctx().get(), set, &out);
  EXPECT_EQ(s.error_code(), StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(s.error_message().find("'4.shortcut.2.running_var' is not part of this model"),
            std::string::npos);
}

TEST_F(ResidualServiceTest, StatusStatsOptionsAndMetricsCarryNestedLabels) {
  ASSERT_TRUE(Create("labels", ResNetSpec()).ok());
  v1::TrainStepResponse r;
  ASSERT_TRUE(TrainStep("labels", 4, 1, &r).ok());
  // 4 samples of 4x4 values per channel after the stride-2 block: 64 >= 40, no warning;
  // 2 samples give 32.
  EXPECT_EQ(r.warnings_size(), 0);
  ASSERT_TRUE(TrainStep("labels", 2, 2, &r).ok());
  std::vector<std::string> warned;
  for (const v1::SmallBatchWarning& w : r.warnings()) warned.push_back(w.layer());
  EXPECT_EQ(warned, (std::vector<std::string>{"4.body.1", "4.body.4", "4.shortcut.1"}));

  v1::Model m = Get("labels");
  std::vector<std::string> bns;
  for (const v1::BatchNormStatus& b : m.batch_norms()) {
    bns.push_back(b.layer());
    EXPECT_EQ(b.num_batches_tracked(), 2u) << b.layer();
    EXPECT_GT(b.running_mean_update_norm(), 0.0f) << b.layer();
  }
  EXPECT_EQ(bns, (std::vector<std::string>{"1", "3.body.1", "b3_bn2", "4.body.1", "4.body.4",
                                           "4.shortcut.1"}));

  // Every per-model series carries the tenant label (no auth: tenant "default") beside the
  // nested layer's path.
  const std::string text = HttpGet(server_->metrics_port(), "/metrics");
  EXPECT_EQ(MetricValue(text, "normd_bn_batches_tracked",
                        {"tenant=\"default\"", "model=\"labels\"", "layer=\"4.shortcut.1\""}),
            2.0);
  EXPECT_EQ(MetricValue(text, "normd_bn_small_batch_total",
                        {"tenant=\"default\"", "model=\"labels\"", "layer=\"4.body.4\""}),
            1.0);
  // The drift histograms of a nested BatchNorm: the second step's batch against the running
  // statistics the first one left.
  EXPECT_GE(MetricValue(text, "normd_bn_mean_shift_count",
                        {"tenant=\"default\"", "model=\"labels\"", "layer=\"4.shortcut.1\"",
                         "mode=\"train\""}),
            1.0);
  EXPECT_GE(MetricValue(text, "normd_bn_var_log_ratio_count",
                        {"tenant=\"default\"", "model=\"labels\"", "layer=\"b3_bn2\"",
                         "mode=\"train\""}),
            1.0);

  v1::ForwardRequest fwd;
  fwd.set_model("labels");
  *fwd.mutable_input() = MakeTensor({4, 3, 8, 8}, RandomValues(4 * 192, 3));
  fwd.set_layer_stats(true);
  v1::ForwardResponse resp;
  ASSERT_TRUE(stub_->Forward(Ctx().get(), fwd, &resp).ok());
  ASSERT_EQ(resp.layer_stats_size(), 9 + 5 + 7);
  EXPECT_EQ(resp.layer_stats(3).kind(), "residual");
  EXPECT_EQ(resp.layer_stats(4).name(), "3.body.0");
  EXPECT_EQ(resp.layer_stats(8).name(), "b3_bn2");
  EXPECT_EQ(resp.layer_stats(16).name(), "4.shortcut.1");
  EXPECT_EQ(resp.layer_stats(16).kind(), "BatchNorm2d");
  EXPECT_EQ(resp.layer_stats(18).kind(), "AdaptiveAvgPool2d");
  EXPECT_EQ(resp.layer_stats(18).index(), 18);
  EXPECT_FLOAT_EQ(resp.layer_stats(17).input_mean(), resp.layer_stats(9).output_mean());

  v1::SetLayerOptionsRequest opts;
  opts.set_model("labels");
  v1::LayerOptions* o = opts.add_layers();
  o->set_layer("4.shortcut.1");
  o->set_frozen(true);
  o = opts.add_layers();
  o->set_layer("3");  // a whole block
  o->set_trainable(false);
  ASSERT_TRUE(stub_->SetLayerOptions(Ctx().get(), opts, &m).ok());
  std::map<std::string, v1::LayerOptions> by_label;
  for (const v1::LayerOptions& lo : m.layer_options()) by_label[lo.layer()] = lo;
  EXPECT_TRUE(by_label.at("4.shortcut.1").frozen());
  EXPECT_FALSE(by_label.at("3.body.0").trainable());
  EXPECT_FALSE(by_label.at("b3_bn2").trainable());
  EXPECT_TRUE(by_label.at("4.body.0").trainable());
  EXPECT_EQ(by_label.count("3"), 0u);
  o->set_layer("3.body.9");
  grpc::Status s = stub_->SetLayerOptions(Ctx().get(), opts, &m);
  EXPECT_EQ(s.error_code(), StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(s.error_message().find("no layer '3.body.9'"), std::string::npos);
}

TEST_F(ResidualServiceTest, FoldBatchNormFoldsInsideBlocks) {
  ASSERT_TRUE(Create("fold-src", ResNetSpec()).ok());
  v1::TrainStepResponse r;
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(TrainStep("fold-src", 8, 10 + i, &r).ok());
  v1::SetModeRequest mode;
  mode.set_model("fold-src");
  mode.set_mode(v1::MODE_EVAL);
  v1::Model m;
  ASSERT_TRUE(stub_->SetMode(Ctx().get(), mode, &m).ok());
  v1::FoldBatchNormRequest req;
  req.set_model("fold-src");
  req.set_new_model("fold-copy");
  v1::FoldBatchNormResponse resp;
  grpc::Status s = stub_->FoldBatchNorm(Ctx().get(), req, &resp);
  ASSERT_TRUE(s.ok()) << s.error_message();
  ASSERT_EQ(resp.spec().layers_size(), 8);
  const v1::ResidualSpec& b4 = resp.spec().layers(3).residual();
  EXPECT_EQ(b4.body_size(), 3);
  EXPECT_EQ(b4.shortcut_size(), 1);
  EXPECT_TRUE(b4.shortcut(0).conv2d().bias());
  EXPECT_TRUE(resp.model().batch_norms().empty());
  for (const v1::NamedTensor& t : resp.state().tensors()) {
    EXPECT_EQ(t.name().find("running"), std::string::npos) << t.name();
  }

  v1::ForwardRequest fwd;
  *fwd.mutable_input() = MakeTensor({3, 3, 8, 8}, RandomValues(3 * 192, 21));
  v1::ForwardResponse a, b;
  fwd.set_model("fold-src");
  ASSERT_TRUE(stub_->Forward(Ctx().get(), fwd, &a).ok());
  fwd.set_model("fold-copy");
  ASSERT_TRUE(stub_->Forward(Ctx().get(), fwd, &b).ok());
  const std::vector<float> va = Values(a.output()), vb = Values(b.output());
  ASSERT_EQ(va.size(), vb.size());
  for (size_t i = 0; i < va.size(); ++i) EXPECT_NEAR(va[i], vb[i], 1e-4f * (1 + std::fabs(va[i])));
}

// A residual model with options on nested layers survives a restart (checkpoint, restore).
TEST(ResidualCheckpointTest, RestartRestoresNestedStateAndOptions) {
  char tmpl[] = "/tmp/normd-residual-ckpt-XXXXXX";
  ASSERT_NE(mkdtemp(tmpl), nullptr);
  const std::string data = std::string("--data-dir=") + tmpl;
  std::map<std::string, std::vector<float>> before;
  std::string error;
  {
    auto server = NormdProcess::Start({data}, &error);
    ASSERT_NE(server, nullptr) << error;
    auto stub = server->NewStub();
    v1::CreateModelRequest create;
    create.set_id("res");
    *create.mutable_spec() = ResNetSpec();
    v1::Model m;
    ASSERT_TRUE(stub->CreateModel(Ctx().get(), create, &m).ok());
    v1::SetLayerOptionsRequest opts;
    opts.set_model("res");
    v1::LayerOptions* o = opts.add_layers();
    o->set_layer("4.shortcut.1");
    o->set_frozen(true);
    o = opts.add_layers();
    o->set_layer("3.body.0");
    o->set_trainable(false);
    ASSERT_TRUE(stub->SetLayerOptions(Ctx().get(), opts, &m).ok());
    for (int i = 0; i < 3; ++i) {
      v1::TrainStepRequest req;
      req.set_model("res");
      *req.mutable_input() = MakeTensor({4, 3, 8, 8}, RandomValues(4 * 192, 30 + i));
      for (int64_t l : RandomLabels(4, 5, 30 + i)) req.add_labels(l);
      v1::TrainStepResponse r;
      ASSERT_TRUE(stub->TrainStep(Ctx().get(), req, &r).ok());
    }
    before = StateMap(GetState(stub.get(), "res", /*optimizer=*/true));
    EXPECT_EQ(server->Stop(SIGTERM, std::chrono::seconds(20)), 0);  // saves the model
  }
  {
    auto server = NormdProcess::Start({data}, &error);
    ASSERT_NE(server, nullptr) << error;
    auto stub = server->NewStub();
    v1::GetModelRequest gm;
    gm.set_model("res");
    v1::Model m;
    ASSERT_TRUE(stub->GetModel(Ctx().get(), gm, &m).ok());
    EXPECT_EQ(m.step(), 3u);
    std::map<std::string, v1::LayerOptions> by_label;
    for (const v1::LayerOptions& lo : m.layer_options()) by_label[lo.layer()] = lo;
    EXPECT_TRUE(by_label.at("4.shortcut.1").frozen());
    EXPECT_FALSE(by_label.at("3.body.0").trainable());
    const auto after = StateMap(GetState(stub.get(), "res", /*optimizer=*/true));
    ASSERT_EQ(after.size(), before.size());
    for (const auto& [name, v] : before) EXPECT_TRUE(BitEqual(v, after.at(name))) << name;
  }
  std::filesystem::remove_all(tmpl);
}

}  // namespace
}  // namespace normd::testing
