// Unit tests of server/convert.h (wire <-> core) and server/status_map.h.
#include "server/convert.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <functional>
#include <limits>

#include "server/registry.h"
#include "server/status_map.h"

namespace normd::server {
namespace {

v1::ModelSpec ValidSpec() {
  v1::ModelSpec spec;
  spec.add_input_shape(1);
  spec.add_input_shape(8);
  spec.add_input_shape(8);
  auto* conv = spec.add_layers()->mutable_conv2d();
  conv->set_in_channels(1);
  conv->set_out_channels(4);
  conv->set_kernel_size(3);
  conv->set_padding(1);
  spec.add_layers()->mutable_batch_norm2d()->set_num_features(4);
  spec.add_layers()->mutable_relu();
  spec.add_layers()->mutable_max_pool2d()->set_kernel_size(2);
  spec.add_layers()->mutable_flatten();
  auto* lin = spec.add_layers()->mutable_linear();
  lin->set_in_features(64);
  lin->set_out_features(10);
  lin->set_bias(false);
  spec.set_loss(v1::LOSS_CROSS_ENTROPY);
  spec.mutable_optimizer()->mutable_adam()->set_lr(0.001f);
  spec.set_seed(7);
  return spec;
}

TEST(SpecToConfigTest, FillsDefaultsAndExplicitValues) {
  v1::ModelSpec spec = ValidSpec();
  spec.mutable_layers(1)->mutable_batch_norm2d()->set_momentum(0.25f);
  ModelConfig c;
  ASSERT_TRUE(SpecToConfig(spec, &c).ok());
  EXPECT_EQ(c.input_shape, (std::vector<int64_t>{1, 8, 8}));
  ASSERT_EQ(c.layers.size(), 6u);
  EXPECT_EQ(c.layers[0].kind, LayerKind::kConv2d);
  EXPECT_EQ(c.layers[0].conv2d.stride, 1);  // default
  EXPECT_EQ(c.layers[0].conv2d.padding, 1);
  EXPECT_TRUE(c.layers[0].conv2d.bias);  // default
  EXPECT_EQ(c.layers[1].kind, LayerKind::kBatchNorm2d);
  EXPECT_FLOAT_EQ(c.layers[1].batch_norm.eps, 1e-5f);
  EXPECT_FLOAT_EQ(c.layers[1].batch_norm.momentum, 0.25f);
  EXPECT_TRUE(c.layers[1].batch_norm.affine);
  EXPECT_TRUE(c.layers[1].batch_norm.track_running_stats);
  EXPECT_EQ(c.layers[3].kind, LayerKind::kMaxPool2d);
  EXPECT_EQ(c.layers[3].pool.stride, 0);  // PyTorch's stride=None
  EXPECT_FALSE(c.layers[5].linear.bias);
  EXPECT_EQ(c.optimizer.kind, OptimizerKind::kAdam);
  EXPECT_FLOAT_EQ(c.optimizer.adam.beta2, 0.999f);
  EXPECT_EQ(c.seed, 7u);
  // The whole thing builds.
  std::unique_ptr<Model> model;
  ASSERT_TRUE(Model::Create(c, Sequential::Limits(), &model).ok());
}

// A mutation of a valid spec and the INVALID_ARGUMENT message SpecToConfig must give for it
// (a substring of the message).
struct SpecErrorCase {
  std::function<void(v1::ModelSpec*)> mutate;
  std::string message;
};

// Applies each case's mutation to a copy of `valid` and checks SpecToConfig's answer.
void ExpectSpecErrors(const v1::ModelSpec& valid, const std::vector<SpecErrorCase>& cases) {
  for (const SpecErrorCase& c : cases) {
    v1::ModelSpec spec = valid;
    c.mutate(&spec);
    ModelConfig config;
    const Status s = SpecToConfig(spec, &config);
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << c.message;
    EXPECT_NE(s.message().find(c.message), std::string::npos)
        << "want: " << c.message << "\ngot:  " << s.message();
  }
}

TEST(SpecToConfigTest, RecipeFieldsAndTheirDefaults) {
  v1::ModelSpec spec = ValidSpec();
  ModelConfig c;
  ASSERT_TRUE(SpecToConfig(spec, &c).ok());
  EXPECT_FALSE(c.optimizer.schedule.active());  // unset: no schedule, no clipping, one group
  EXPECT_EQ(c.optimizer.max_grad_norm, 0.0);
  EXPECT_FALSE(c.optimizer.no_weight_decay_on_norm_and_bias);
  EXPECT_EQ(c.label_smoothing, 0.0);

  v1::OptimizerSpec* o = spec.mutable_optimizer();
  o->mutable_lr_schedule()->mutable_warmup()->set_steps(7);  // start_factor unset: 1/3
  o->mutable_lr_schedule()->mutable_step()->set_step_size(4);  // gamma unset: 0.1
  o->mutable_clip_grad_norm()->set_max_norm(2.5);
  o->set_no_weight_decay_on_norm_and_bias(true);
  spec.mutable_loss_options()->set_label_smoothing(0.15);
  ASSERT_TRUE(SpecToConfig(spec, &c).ok());
  const LrScheduleConfig& s = c.optimizer.schedule;
  EXPECT_EQ(s.warmup_steps, 7);
  EXPECT_EQ(s.warmup_start_factor, 1.0 / 3.0);  // LinearLR's default
  EXPECT_EQ(s.decay, LrScheduleConfig::Decay::kStep);
  EXPECT_EQ(s.step_size, 4);
  EXPECT_EQ(s.gamma, 0.1);  // StepLR's default
  EXPECT_EQ(c.optimizer.max_grad_norm, 2.5);
  EXPECT_TRUE(c.optimizer.no_weight_decay_on_norm_and_bias);
  EXPECT_EQ(c.label_smoothing, 0.15);

  o->mutable_lr_schedule()->mutable_cosine()->set_t_max(30);  // the oneof: cosine replaces step
  o->mutable_lr_schedule()->mutable_cosine()->set_eta_min(1e-5);
  OptimizerConfig oc;
  ASSERT_TRUE(OptimizerSpecToConfig(*o, "optimizer", &oc).ok());
  EXPECT_EQ(oc.schedule.decay, LrScheduleConfig::Decay::kCosine);
  EXPECT_EQ(oc.schedule.t_max, 30);
  EXPECT_EQ(oc.schedule.eta_min, 1e-5);
  // Sizes beyond the spec limit are refused like every other size.
  o->mutable_lr_schedule()->mutable_cosine()->set_t_max(int64_t{1} << 40);
  const Status st = OptimizerSpecToConfig(*o, "optimizer", &oc);
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("optimizer.lr_schedule.cosine.t_max must be at most"),
            std::string::npos)
      << st.message();
}

TEST(SpecToConfigTest, MessagesNameTheField) {
  const std::vector<SpecErrorCase> cases = {
      {[](v1::ModelSpec* s) { s->mutable_layers(1)->mutable_batch_norm2d()->set_eps(0); },
       "spec.layers[1].batch_norm2d.eps must be > 0, got 0"},
      {[](v1::ModelSpec* s) { s->mutable_layers(1)->mutable_batch_norm2d()->set_eps(NAN); },
       "spec.layers[1].batch_norm2d.eps must be > 0, got nan"},
      {[](v1::ModelSpec* s) { s->mutable_layers(1)->mutable_batch_norm2d()->set_momentum(-0.1f); },
       "spec.layers[1].batch_norm2d.momentum must be in [0, 1], got -0.1"},
      {[](v1::ModelSpec* s) {
         s->mutable_layers(1)->mutable_batch_norm2d()->set_cumulative_average(true);
         s->mutable_layers(1)->mutable_batch_norm2d()->set_momentum(0.1f);
       },
       "momentum must not be set with"},
      {[](v1::ModelSpec* s) { s->mutable_layers(1)->mutable_batch_norm2d()->set_num_features(0); },
       "spec.layers[1].batch_norm2d.num_features must be >= 1, got 0"},
      {[](v1::ModelSpec* s) { s->mutable_layers(0)->mutable_conv2d()->set_stride(0); },
       "spec.layers[0].conv2d.stride must be >= 1, got 0"},
      {[](v1::ModelSpec* s) { s->mutable_layers(0)->mutable_conv2d()->set_padding(-1); },
       "spec.layers[0].conv2d.padding must be >= 0, got -1"},
      {[](v1::ModelSpec* s) { s->mutable_layers(0)->mutable_conv2d()->set_kernel_size(1LL << 40); },
       "spec.layers[0].conv2d.kernel_size must be at most 2147483647"},
      {[](v1::ModelSpec* s) { s->mutable_layers(3)->mutable_max_pool2d()->set_kernel_size(0); },
       "spec.layers[3].max_pool2d.kernel_size must be >= 1, got 0"},
      {[](v1::ModelSpec* s) { s->mutable_layers(2)->mutable_dropout()->set_p(-0.5f); },
       "spec.layers[2].dropout.p must be in [0, 1), got -0.5"},
      {[](v1::ModelSpec* s) { s->mutable_layers(2)->mutable_leaky_relu()->set_negative_slope(INFINITY); },
       "spec.layers[2].leaky_relu.negative_slope must be finite"},
      {[](v1::ModelSpec* s) { s->mutable_layers(2)->mutable_layer_norm(); },
       "spec.layers[2].layer_norm.normalized_shape must have at least one dimension"},
      {[](v1::ModelSpec* s) { s->mutable_layers(2)->Clear(); }, "spec.layers[2] has no layer kind"},
      {[](v1::ModelSpec* s) { s->mutable_layers(2)->set_name("has space"); },
       "spec.layers[2].name may contain only"},
      {[](v1::ModelSpec* s) { s->mutable_layers(2)->set_name(std::string(65, 'n')); },
       "spec.layers[2].name must be at most 64"},
      {[](v1::ModelSpec* s) { s->clear_layers(); }, "spec.layers is empty"},
      {[](v1::ModelSpec* s) { s->set_input_shape(1, -8); },
       "spec.input_shape[1] must be >= 1, got -8"},
      {[](v1::ModelSpec* s) { s->set_loss(static_cast<v1::Loss>(42)); }, "spec.loss"},
      {[](v1::ModelSpec* s) { s->mutable_optimizer()->mutable_adam()->set_lr(0); },
       "spec.optimizer.adam.lr must be > 0, got 0"},
      {[](v1::ModelSpec* s) { s->mutable_optimizer()->mutable_adam()->set_beta1(1.0f); },
       "spec.optimizer.adam.beta1 must be in [0, 1), got 1"},
      {[](v1::ModelSpec* s) {
         auto* sgd = s->mutable_optimizer()->mutable_sgd();
         sgd->set_lr(0.1f);
         sgd->set_nesterov(true);
       },
       "spec.optimizer.sgd.nesterov requires momentum > 0"},
      {[](v1::ModelSpec* s) { s->mutable_optimizer()->Clear(); },
       "spec.optimizer must set sgd or adam"},
  };
  ExpectSpecErrors(ValidSpec(), cases);
}

// ValidSpec with its ReLU (layer 2) replaced by a residual block
//   body: Conv2d(4, 4, 3, pad 1, groups 4, no bias), BatchNorm2d(4), ReLU, Conv2d(4, 4, 1)
//   shortcut: BatchNorm2d(4) named "skip_bn"
// and global average pooling before the flatten (layer 3), so the head takes 4 features.
v1::ModelSpec ResidualSpec() {
  v1::ModelSpec spec = ValidSpec();
  v1::ResidualSpec* block = spec.mutable_layers(2)->mutable_residual();
  auto* dw = block->add_body()->mutable_conv2d();
  dw->set_in_channels(4);
  dw->set_out_channels(4);
  dw->set_kernel_size(3);
  dw->set_padding(1);
  dw->set_groups(4);
  dw->set_bias(false);
  block->add_body()->mutable_batch_norm2d()->set_num_features(4);
  block->add_body()->mutable_relu();
  auto* pw = block->add_body()->mutable_conv2d();
  pw->set_in_channels(4);
  pw->set_out_channels(4);
  pw->set_kernel_size(1);
  v1::LayerSpec* skip = block->add_shortcut();
  skip->set_name("skip_bn");
  skip->mutable_batch_norm2d()->set_num_features(4);
  spec.mutable_layers(3)->mutable_adaptive_avg_pool2d();
  spec.mutable_layers(5)->mutable_linear()->set_in_features(4);
  return spec;
}

TEST(SpecToConfigTest, ResidualBlocksGroupsAndGlobalPooling) {
  ModelConfig c;
  Status s = SpecToConfig(ResidualSpec(), &c);
  ASSERT_TRUE(s.ok()) << s.message();
  ASSERT_EQ(c.layers.size(), 6u);
  EXPECT_EQ(c.layers[0].conv2d.groups, 1);  // default
  ASSERT_EQ(c.layers[2].kind, LayerKind::kResidual);
  const ResidualConfig& block = c.layers[2].residual;
  ASSERT_EQ(block.body.size(), 4u);
  EXPECT_EQ(block.body[0].kind, LayerKind::kConv2d);
  EXPECT_EQ(block.body[0].conv2d.groups, 4);
  EXPECT_FALSE(block.body[0].conv2d.bias);
  EXPECT_EQ(block.body[1].kind, LayerKind::kBatchNorm2d);
  EXPECT_EQ(block.body[2].kind, LayerKind::kReLU);
  ASSERT_EQ(block.shortcut.size(), 1u);
  EXPECT_EQ(block.shortcut[0].name, "skip_bn");
  EXPECT_EQ(c.layers[3].kind, LayerKind::kAdaptiveAvgPool2d);
  std::unique_ptr<Model> model;
  s = Model::Create(c, Sequential::Limits(), &model);
  ASSERT_TRUE(s.ok()) << s.message();
  EXPECT_EQ(model->net().output_shape(), (Shape{10}));
  EXPECT_EQ(model->net().parameter_count(), 40 + 8 + 36 + 8 + 20 + 8 + 40);
}

TEST(SpecToConfigTest, NestedMessagesNameTheFieldPath) {
  auto body = [](v1::ModelSpec* s, int i) {
    return s->mutable_layers(2)->mutable_residual()->mutable_body(i);
  };
  const std::vector<SpecErrorCase> cases = {
      {[&](v1::ModelSpec* s) { body(s, 1)->mutable_batch_norm2d()->set_eps(0); },
       "spec.layers[2].residual.body[1].batch_norm2d.eps must be > 0, got 0"},
      {[&](v1::ModelSpec* s) { body(s, 0)->mutable_conv2d()->set_groups(0); },
       "spec.layers[2].residual.body[0].conv2d.groups must be >= 1, got 0"},
      {[&](v1::ModelSpec* s) { body(s, 0)->mutable_conv2d()->set_groups(3); },
       "spec.layers[2].residual.body[0].conv2d.in_channels (4) and "
       "spec.layers[2].residual.body[0].conv2d.out_channels (4) must both be divisible by "
       "spec.layers[2].residual.body[0].conv2d.groups (3)"},
      {[&](v1::ModelSpec* s) { body(s, 3)->Clear(); },
       "spec.layers[2].residual.body[3] has no layer kind set"},
      {[](v1::ModelSpec* s) {
         s->mutable_layers(2)->mutable_residual()->mutable_shortcut(0)->set_name("a b");
       },
       "spec.layers[2].residual.shortcut[0].name may contain only"},
      {[](v1::ModelSpec* s) { s->mutable_layers(2)->mutable_residual()->clear_body(); },
       "spec.layers[2].residual.body is empty: a residual block needs at least one layer"},
      {[](v1::ModelSpec* s) {
         v1::LayerSpec inner = s->layers(2);
         for (int d = 0; d < kMaxResidualDepth; ++d) {
           v1::LayerSpec outer;
           *outer.mutable_residual()->add_body() = inner;
           inner = outer;
         }
         *s->mutable_layers(2) = inner;
       },
       "residual blocks nest more than 16 deep"},
  };
  ExpectSpecErrors(ResidualSpec(), cases);
}

TEST(FoldedSpecToWireTest, FoldsInsideBranchesAndKeepsTheWireFields) {
  ModelConfig c;
  ASSERT_TRUE(SpecToConfig(ResidualSpec(), &c).ok());
  std::unique_ptr<Model> model;
  ASSERT_TRUE(Model::Create(c, Sequential::Limits(), &model).ok());
  FoldedModel folded;
  FoldBatchNorm(*model, &folded);
  v1::ModelSpec out;
  FoldedSpecToWire(ResidualSpec(), folded, &out);
  ASSERT_EQ(out.layers_size(), 5);  // the stem's BatchNorm folded into its Conv2d
  EXPECT_TRUE(out.layers(0).conv2d().bias());
  const v1::ResidualSpec& block = out.layers(1).residual();
  ASSERT_EQ(block.body_size(), 3);  // the depthwise Conv2d took its BatchNorm
  EXPECT_TRUE(block.body(0).conv2d().bias());
  EXPECT_EQ(block.body(0).conv2d().groups(), 4);
  EXPECT_TRUE(block.body(1).has_relu());
  EXPECT_FALSE(block.body(2).conv2d().has_bias());  // untouched: still unset on the wire
  ASSERT_EQ(block.shortcut_size(), 1);  // a BatchNorm after no Conv2d stays
  EXPECT_EQ(block.shortcut(0).name(), "skip_bn");
  // The folded spec builds into the folded config's model.
  ModelConfig again;
  ASSERT_TRUE(SpecToConfig(out, &again).ok());
  std::unique_ptr<Model> copy;
  ASSERT_TRUE(Model::Create(again, Sequential::Limits(), &copy).ok());
  EXPECT_TRUE(copy->SetState(folded.state, /*strict=*/true).ok());
}

TEST(DecodeTensorTest, ValuesAreUsedInPlace) {
  v1::Tensor t;
  t.add_shape(2);
  t.add_shape(3);
  for (int i = 0; i < 6; ++i) t.add_values(static_cast<float>(i));
  DecodedTensor d;
  ASSERT_TRUE(DecodeTensor(t, "input", 100, &d).ok());
  EXPECT_EQ(d.view().data, t.values().data());  // zero copies
  EXPECT_FALSE(d.raw());
  EXPECT_FALSE(d.copied());
  EXPECT_EQ(d.view().shape, (Shape{2, 3}));
}

TEST(DecodeTensorTest, RawIsUsedInPlaceWhenAligned) {
  const std::vector<float> v = {1.5f, -2.0f, 3.25f, 4.0f};
  v1::Tensor t;
  t.add_shape(2);
  t.add_shape(2);
  t.set_raw(std::string(reinterpret_cast<const char*>(v.data()), 16));
  DecodedTensor d;
  ASSERT_TRUE(DecodeTensor(t, "input", 100, &d).ok());
  EXPECT_TRUE(d.raw());
  // std::string's heap buffer is 16-byte aligned with glibc: the view is the message's bytes.
  ASSERT_EQ(reinterpret_cast<uintptr_t>(t.raw().data()) % 4, 0u);
  EXPECT_EQ(static_cast<const void*>(d.view().data), static_cast<const void*>(t.raw().data()));
  EXPECT_FALSE(d.copied());
  EXPECT_EQ(std::vector<float>(d.view().data, d.view().data + 4), v);
}

TEST(DecodeTensorTest, Rejections) {
  DecodedTensor d;
  v1::Tensor t;
  t.add_shape(2);
  t.add_values(1);
  t.add_values(2);
  t.set_raw(std::string(8, '\0'));
  Status s = DecodeTensor(t, "input", 100, &d);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("input sets both values and raw"), std::string::npos);

  t.clear_values();
  t.set_raw(std::string(7, '\0'));
  s = DecodeTensor(t, "grad_output", 100, &d);
  EXPECT_NE(s.message().find("grad_output.raw has 7 bytes, not a multiple of 4"),
            std::string::npos)
      << s.message();

  t.set_raw(std::string(12, '\0'));
  s = DecodeTensor(t, "input", 100, &d);
  EXPECT_NE(s.message().find("input has 3 values but its shape (2) needs 2"), std::string::npos)
      << s.message();

  t.clear_shape();
  t.add_shape(3);
  t.add_shape(-1);
  s = DecodeTensor(t, "target", 100, &d);
  EXPECT_NE(s.message().find("target.shape[1] must be >= 0, got -1"), std::string::npos);

  t.clear_shape();
  for (int i = 0; i < 7; ++i) t.add_shape(1);
  s = DecodeTensor(t, "input", 100, &d);
  EXPECT_NE(s.message().find("7 dimensions"), std::string::npos) << s.message();

  t.clear_shape();
  t.add_shape(int64_t{1} << 62);
  t.add_shape(int64_t{1} << 62);  // an element count past int64: malformed, whatever the limit
  s = DecodeTensor(t, "input", std::numeric_limits<int64_t>::max(), &d);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.message();
  EXPECT_EQ(s.message(), "input has shape (4611686018427387904, 4611686018427387904), whose "
                         "element count overflows a 64-bit integer");
  v1::Tensor empty;  // a zero dimension makes any shape empty: no overflow
  empty.add_shape(int64_t{1} << 62);
  empty.add_shape(int64_t{1} << 62);
  empty.add_shape(0);
  DecodedTensor e;
  s = DecodeTensor(empty, "input", 1000, &e);
  EXPECT_EQ(s.code(), StatusCode::kOk) << s.message();

  t.clear_shape();
  t.add_shape(int64_t{1} << 31);
  t.add_shape(int64_t{1} << 31);  // 2^62 elements fit in int64: over the limit, not malformed
  s = DecodeTensor(t, "input", 1000, &d);
  EXPECT_EQ(s.code(), StatusCode::kResourceExhausted) << s.message();
}

TEST(EncodeTensorTest, RoundTripsInBothEncodings) {
  const std::vector<float> v = {0.1f, -0.0f, 1e30f, -7.0f, 3.0f, 9.5f};
  for (bool raw : {false, true}) {
    v1::Tensor t;
    EncodeTensor(v.data(), Shape{3, 2}, raw, &t);
    EXPECT_EQ(t.shape_size(), 2);
    EXPECT_EQ(raw, !t.raw().empty());
    DecodedTensor d;
    ASSERT_TRUE(DecodeTensor(t, "x", 100, &d).ok());
    EXPECT_EQ(std::memcmp(d.view().data, v.data(), v.size() * 4), 0);
  }
}

TEST(DecodeTargetsTest, LabelsInPlaceAndExclusive) {
  google::protobuf::RepeatedField<int64_t> labels;
  labels.Add(3);
  labels.Add(1);
  DecodedTargets t;
  ASSERT_TRUE(DecodeTargets(labels, nullptr, 100, &t).ok());
  EXPECT_EQ(t.targets.labels, labels.data());
  EXPECT_EQ(t.targets.num_labels, 2);
  v1::Tensor target;
  target.add_shape(2);
  target.add_values(1);
  target.add_values(2);
  EXPECT_EQ(DecodeTargets(labels, &target, 100, &t).code(), StatusCode::kInvalidArgument);
}

TEST(ModelIdTest, Rules) {
  for (const char* ok : {"a", "model-1", "A.b_c-9", "_x", "-x", "0"}) {
    EXPECT_TRUE(ValidateModelId(ok, "id").ok()) << ok;
  }
  EXPECT_TRUE(ValidateModelId(std::string(64, 'x'), "id").ok());
  for (const std::string& bad : {std::string(""), std::string(".x"), std::string("a/b"),
                                std::string("a b"), std::string(65, 'x'), std::string("é")}) {
    EXPECT_EQ(ValidateModelId(bad, "id").code(), StatusCode::kInvalidArgument) << bad;
  }
}

TEST(StatusMapTest, EveryCodeMapsOnce) {
  EXPECT_TRUE(ToGrpcStatus(Status::Ok()).ok());
  const std::pair<StatusCode, grpc::StatusCode> pairs[] = {
      {StatusCode::kInvalidArgument, grpc::StatusCode::INVALID_ARGUMENT},
      {StatusCode::kFailedPrecondition, grpc::StatusCode::FAILED_PRECONDITION},
      {StatusCode::kAborted, grpc::StatusCode::ABORTED},
      {StatusCode::kNotFound, grpc::StatusCode::NOT_FOUND},
      {StatusCode::kAlreadyExists, grpc::StatusCode::ALREADY_EXISTS},
      {StatusCode::kResourceExhausted, grpc::StatusCode::RESOURCE_EXHAUSTED},
      {StatusCode::kUnavailable, grpc::StatusCode::UNAVAILABLE},
      {StatusCode::kInternal, grpc::StatusCode::INTERNAL},
  };
  for (const auto& [core, grpc_code] : pairs) {
    const grpc::Status g = ToGrpcStatus(Status(core, "why"));
    EXPECT_EQ(g.error_code(), grpc_code);
    EXPECT_EQ(g.error_message(), "why");
  }
  EXPECT_STREQ(GrpcCodeName(grpc::StatusCode::RESOURCE_EXHAUSTED), "RESOURCE_EXHAUSTED");
}

}  // namespace
}  // namespace normd::server
