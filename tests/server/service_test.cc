// Integration tests of the Trainer service: the real normd binary on a loopback port, driven by
// the generated stub. Every RPC's success path, every status code of the contract, the
// train/eval semantics, atomicity of failed requests, TrainStream and concurrent clients.
#include <gtest/gtest.h>

#include <atomic>
#include <cmath>
#include <filesystem>
#include <mutex>
#include <regex>
#include <string>
#include <thread>

#include "core/loss.h"
#include "core/tensor.h"
#include "tests/server/normd_process.h"
#include "tests/server/shared_normd_test.h"

namespace normd::testing {
namespace {

using grpc::StatusCode;

constexpr int kIn = 32;
constexpr int kOut = 10;

class ServiceTest : public SharedNormdTest<ServiceTest> {
 public:
  static std::vector<std::string> ServerFlags() {
    return {"--max-retained-forwards=4", "--retained-forward-timeout=2",
            "--max-parameters=1000000", "--compute-threads=2"};
  }

 protected:

  v1::Model Create(const std::string& id, const v1::ModelSpec& spec = MlpSpec()) {
    v1::CreateModelRequest req;
    req.set_id(id);
    *req.mutable_spec() = spec;
    v1::Model m;
    grpc::Status s = stub_->CreateModel(Ctx().get(), req, &m);
    EXPECT_TRUE(s.ok()) << s.error_message();
    return m;
  }

  grpc::Status TryCreate(const std::string& id, const v1::ModelSpec& spec, v1::Model* m = nullptr) {
    v1::CreateModelRequest req;
    req.set_id(id);
    *req.mutable_spec() = spec;
    v1::Model ignored;
    return stub_->CreateModel(Ctx().get(), req, m != nullptr ? m : &ignored);
  }

  grpc::Status SetMode(const std::string& id, v1::Mode mode, v1::Model* out = nullptr) {
    v1::SetModeRequest req;
    req.set_model(id);
    req.set_mode(mode);
    v1::Model ignored;
    return stub_->SetMode(Ctx().get(), req, out != nullptr ? out : &ignored);
  }

  grpc::Status Forward(const std::string& id, const v1::Tensor& x, v1::ForwardResponse* resp,
                       bool retain = false, bool layer_stats = false) {
    v1::ForwardRequest req;
    req.set_model(id);
    *req.mutable_input() = x;
    req.set_retain_for_backward(retain);
    req.set_layer_stats(layer_stats);
    return stub_->Forward(Ctx().get(), req, resp);
  }

  grpc::Status TrainStep(const std::string& id, const v1::Tensor& x,
                         const std::vector<int64_t>& labels, v1::TrainStepResponse* resp) {
    v1::TrainStepRequest req;
    req.set_model(id);
    *req.mutable_input() = x;
    *req.mutable_labels() = {labels.begin(), labels.end()};
    return stub_->TrainStep(Ctx().get(), req, resp);
  }

  std::map<std::string, std::vector<float>> State(const std::string& id, bool optimizer = true) {
    v1::GetStateRequest req;
    req.set_model(id);
    req.set_include_optimizer(optimizer);
    v1::ModelState st;
    grpc::Status s = stub_->GetState(Ctx().get(), req, &st);
    EXPECT_TRUE(s.ok()) << s.error_message();
    return StateMap(st);
  }

  v1::Model Get(const std::string& id) {
    v1::GetModelRequest req;
    req.set_model(id);
    v1::Model m;
    grpc::Status s = stub_->GetModel(Ctx().get(), req, &m);
    EXPECT_TRUE(s.ok()) << s.error_message();
    return m;
  }

  static v1::Tensor Batch(int n, uint64_t seed, bool raw = false, float shift = 0.0f) {
    return MakeTensor({n, kIn}, RandomValues(static_cast<size_t>(n) * kIn, seed, 1.0f, shift),
                      raw);
  }
};

::testing::AssertionResult StateEqual(const std::map<std::string, std::vector<float>>& a,
                                      const std::map<std::string, std::vector<float>>& b) {
  if (a.size() != b.size()) {
    return ::testing::AssertionFailure() << a.size() << " vs " << b.size() << " entries";
  }
  for (const auto& [name, v] : a) {
    auto it = b.find(name);
    if (it == b.end()) return ::testing::AssertionFailure() << name << " missing";
    if (!BitEqual(v, it->second)) {
      size_t i = 0;
      while (i < v.size() && i < it->second.size() && v[i] == it->second[i]) ++i;
      return ::testing::AssertionFailure()
             << name << " differs at " << i << ": "
             << (i < v.size() ? v[i] : NAN) << " vs "
             << (i < it->second.size() ? it->second[i] : NAN);
    }
  }
  return ::testing::AssertionSuccess();
}

#define EXPECT_STATUS(expr, code, substring)                                    \
  do {                                                                          \
    const grpc::Status st_ = (expr);                                            \
    EXPECT_EQ(st_.error_code(), (code)) << st_.error_message();                 \
    EXPECT_NE(st_.error_message().find(substring), std::string::npos)           \
        << "message: " << st_.error_message();                                  \
  } while (0)

// --- Model lifecycle ---------------------------------------------------------------------------

TEST_F(ServiceTest, CreateGetListDelete) {
  const v1::Model m = Create("life-1");
  EXPECT_EQ(m.id(), "life-1");
  EXPECT_EQ(m.mode(), v1::MODE_TRAIN);  // new models train
  EXPECT_EQ(m.step(), 0u);
  EXPECT_EQ(m.parameter_count(), (kIn * 64 + 64) + 2 * 64 + (64 * kOut + kOut));
  ASSERT_EQ(m.output_shape_size(), 1);
  EXPECT_EQ(m.output_shape(0), kOut);
  ASSERT_EQ(m.batch_norms_size(), 1);
  EXPECT_EQ(m.batch_norms(0).layer(), "bn1");
  EXPECT_EQ(m.batch_norms(0).num_batches_tracked(), 0u);
  EXPECT_EQ(m.spec().SerializeAsString(), MlpSpec().SerializeAsString());

  EXPECT_EQ(Get("life-1").SerializeAsString(), m.SerializeAsString());

  v1::ListModelsResponse list;
  ASSERT_TRUE(stub_->ListModels(Ctx().get(), v1::ListModelsRequest(), &list).ok());
  bool found = false;
  for (const v1::Model& x : list.models()) found = found || x.id() == "life-1";
  EXPECT_TRUE(found);

  v1::DeleteModelRequest del;
  del.set_model("life-1");
  v1::DeleteModelResponse del_resp;
  ASSERT_TRUE(stub_->DeleteModel(Ctx().get(), del, &del_resp).ok());
  v1::GetModelRequest get;
  get.set_model("life-1");
  v1::Model gone;
  EXPECT_STATUS(stub_->GetModel(Ctx().get(), get, &gone), StatusCode::NOT_FOUND, "life-1");
  EXPECT_STATUS(stub_->DeleteModel(Ctx().get(), del, &del_resp), StatusCode::NOT_FOUND, "life-1");
  // The id is free again.
  Create("life-1");
}

TEST_F(ServiceTest, ServerPicksAnIdWhenEmpty) {
  const v1::Model a = Create("");
  const v1::Model b = Create("");
  EXPECT_TRUE(std::regex_match(a.id(), std::regex("[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}"))) << a.id();
  EXPECT_NE(a.id(), b.id());
  EXPECT_EQ(Get(a.id()).id(), a.id());
}

TEST_F(ServiceTest, CreateErrors) {
  Create("dup");
  EXPECT_STATUS(TryCreate("dup", MlpSpec()), StatusCode::ALREADY_EXISTS, "dup");
  EXPECT_STATUS(TryCreate(".hidden", MlpSpec()), StatusCode::INVALID_ARGUMENT, "'.'");
  EXPECT_STATUS(TryCreate("a/b/c", MlpSpec()), StatusCode::INVALID_ARGUMENT, "id");
  EXPECT_STATUS(TryCreate(std::string(65, 'x'), MlpSpec()), StatusCode::INVALID_ARGUMENT,
                "64");

  v1::ModelSpec spec = MlpSpec();
  spec.mutable_layers(1)->mutable_batch_norm1d()->set_eps(0.0f);
  EXPECT_STATUS(TryCreate("bad", spec), StatusCode::INVALID_ARGUMENT,
                "spec.layers[1].batch_norm1d.eps must be > 0, got 0");
  spec = MlpSpec();
  spec.mutable_layers(1)->mutable_batch_norm1d()->set_momentum(1.5f);
  EXPECT_STATUS(TryCreate("bad", spec), StatusCode::INVALID_ARGUMENT,
                "spec.layers[1].batch_norm1d.momentum must be in [0, 1]");
  spec = MlpSpec();
  spec.mutable_layers(1)->mutable_batch_norm1d()->set_num_features(50);
  EXPECT_STATUS(TryCreate("bad", spec), StatusCode::INVALID_ARGUMENT, "layer 1 (BatchNorm1d)");
  spec = MlpSpec();
  spec.mutable_layers(0)->mutable_linear()->set_out_features(0);
  EXPECT_STATUS(TryCreate("bad", spec), StatusCode::INVALID_ARGUMENT,
                "spec.layers[0].linear.out_features must be >= 1, got 0");
  spec = MlpSpec();
  spec.mutable_layers(2)->mutable_dropout()->set_p(1.0f);
  EXPECT_STATUS(TryCreate("bad", spec), StatusCode::INVALID_ARGUMENT, "dropout.p");
  spec = MlpSpec();
  spec.mutable_layers(2)->Clear();
  EXPECT_STATUS(TryCreate("bad", spec), StatusCode::INVALID_ARGUMENT,
                "spec.layers[2] has no layer kind");
  spec = MlpSpec();
  spec.set_loss(v1::LOSS_UNSPECIFIED);
  EXPECT_STATUS(TryCreate("bad", spec), StatusCode::INVALID_ARGUMENT, "spec.loss");
  spec = MlpSpec();
  spec.clear_optimizer();
  EXPECT_STATUS(TryCreate("bad", spec), StatusCode::INVALID_ARGUMENT, "spec.optimizer");
  spec = MlpSpec();
  spec.clear_input_shape();
  EXPECT_STATUS(TryCreate("bad", spec), StatusCode::INVALID_ARGUMENT, "spec.input_shape");
  // 10^9 features: beyond --max-parameters (10^6 here).
  spec = MlpSpec(kIn, 1000000000);
  EXPECT_STATUS(TryCreate("bad", spec), StatusCode::RESOURCE_EXHAUSTED, "more than");
  spec = MlpSpec(kIn, 100000);  // 3.2 million parameters
  EXPECT_STATUS(TryCreate("bad", spec), StatusCode::RESOURCE_EXHAUSTED, "parameters");
  v1::GetModelRequest get;
  get.set_model("bad");
  v1::Model m;
  EXPECT_EQ(stub_->GetModel(Ctx().get(), get, &m).error_code(), StatusCode::NOT_FOUND);
}

TEST_F(ServiceTest, UnknownModelIsNotFoundEverywhere) {
  const std::string id = "no-such-model";
  v1::ForwardResponse f;
  EXPECT_STATUS(Forward(id, Batch(2, 1), &f), StatusCode::NOT_FOUND, id);
  v1::TrainStepResponse t;
  EXPECT_STATUS(TrainStep(id, Batch(2, 1), {0, 1}, &t), StatusCode::NOT_FOUND, id);
  EXPECT_STATUS(SetMode(id, v1::MODE_EVAL), StatusCode::NOT_FOUND, id);
  v1::BackwardRequest b;
  b.set_model(id);
  *b.mutable_grad_output() = MakeTensor({1, kOut}, std::vector<float>(kOut, 0.0f));
  v1::BackwardResponse br;
  EXPECT_STATUS(stub_->Backward(Ctx().get(), b, &br), StatusCode::NOT_FOUND, id);
  v1::ApplyGradientsRequest a;
  a.set_model(id);
  v1::ApplyGradientsResponse ar;
  EXPECT_STATUS(stub_->ApplyGradients(Ctx().get(), a, &ar), StatusCode::NOT_FOUND, id);
  v1::GetStateRequest g;
  g.set_model(id);
  v1::ModelState gs;
  EXPECT_STATUS(stub_->GetState(Ctx().get(), g, &gs), StatusCode::NOT_FOUND, id);
  v1::ResetRunningStatsRequest r;
  r.set_model(id);
  v1::Model rm;
  EXPECT_STATUS(stub_->ResetRunningStats(Ctx().get(), r, &rm), StatusCode::NOT_FOUND, id);
  v1::EvaluateRequest e;
  e.set_model(id);
  *e.mutable_input() = Batch(2, 1);
  e.add_labels(0);
  e.add_labels(1);
  v1::EvaluateResponse er;
  EXPECT_STATUS(stub_->Evaluate(Ctx().get(), e, &er), StatusCode::NOT_FOUND, id);
  // A malformed id is a bad argument, not a missing model.
  EXPECT_STATUS(SetMode("../etc", v1::MODE_EVAL), StatusCode::INVALID_ARGUMENT, "model");
}

// --- Modes and BatchNorm semantics -------------------------------------------------------------

TEST_F(ServiceTest, SetModeValidatesAndReports) {
  Create("mode-1");
  EXPECT_STATUS(SetMode("mode-1", v1::MODE_UNSPECIFIED), StatusCode::INVALID_ARGUMENT,
                "MODE_TRAIN or MODE_EVAL");
  v1::Model m;
  ASSERT_TRUE(SetMode("mode-1", v1::MODE_EVAL, &m).ok());
  EXPECT_EQ(m.mode(), v1::MODE_EVAL);
  EXPECT_EQ(Get("mode-1").mode(), v1::MODE_EVAL);

  v1::SetModeRequest req;
  req.set_model("mode-1");
  req.set_mode(v1::MODE_TRAIN);
  req.set_freeze_running_stats(true);
  ASSERT_TRUE(stub_->SetMode(Ctx().get(), req, &m).ok());
  EXPECT_EQ(m.mode(), v1::MODE_TRAIN);
  EXPECT_TRUE(m.running_stats_frozen());
  // Frozen: a train-mode forward leaves the buffers alone.
  const auto before = State("mode-1");
  v1::ForwardResponse f;
  ASSERT_TRUE(Forward("mode-1", Batch(8, 3), &f).ok());
  EXPECT_TRUE(StateEqual(before, State("mode-1")));
  // Unset freeze_running_stats keeps the setting.
  ASSERT_TRUE(SetMode("mode-1", v1::MODE_TRAIN, &m).ok());
  EXPECT_TRUE(m.running_stats_frozen());
}

TEST_F(ServiceTest, TrainForwardUpdatesRunningStatsEvalForwardDoesNot) {
  Create("sem-1");
  const auto initial = State("sem-1");
  v1::ForwardResponse f1;
  ASSERT_TRUE(Forward("sem-1", Batch(16, 5), &f1).ok());
  const auto after_train = State("sem-1");
  EXPECT_FALSE(BitEqual(initial.at("1.running_mean"), after_train.at("1.running_mean")));
  EXPECT_FALSE(BitEqual(initial.at("1.running_var"), after_train.at("1.running_var")));
  EXPECT_EQ(after_train.at("1.num_batches_tracked"), std::vector<float>{1.0f});
  // Parameters did not move: a forward is not a step.
  EXPECT_TRUE(BitEqual(initial.at("0.weight"), after_train.at("0.weight")));
  EXPECT_EQ(Get("sem-1").batch_norms(0).num_batches_tracked(), 1u);

  ASSERT_TRUE(SetMode("sem-1", v1::MODE_EVAL).ok());
  v1::ForwardResponse e1, e2;
  ASSERT_TRUE(Forward("sem-1", Batch(16, 6), &e1).ok());
  ASSERT_TRUE(Forward("sem-1", Batch(16, 6), &e2).ok());
  EXPECT_TRUE(BitEqual(Values(e1.output()), Values(e2.output())));
  EXPECT_TRUE(StateEqual(after_train, State("sem-1")));
  // Eval mode normalises with running statistics: a batch of one is fine.
  v1::ForwardResponse single;
  ASSERT_TRUE(Forward("sem-1", Batch(1, 7), &single).ok());
  EXPECT_EQ(Values(single.output()).size(), static_cast<size_t>(kOut));
  // The same sample alone and inside a batch gives the same output in eval mode.
  std::vector<float> batch_out = Values(e1.output());
  v1::ForwardResponse first;
  std::vector<float> row0 = Values(Batch(16, 6));
  row0.resize(kIn);
  ASSERT_TRUE(Forward("sem-1", MakeTensor({1, kIn}, row0), &first).ok());
  const std::vector<float> alone = Values(first.output());
  for (int j = 0; j < kOut; ++j) EXPECT_NEAR(alone[j], batch_out[j], 1e-5f);
}

TEST_F(ServiceTest, ForwardEncodingsAndLayerStats) {
  Create("enc-1");
  ASSERT_TRUE(SetMode("enc-1", v1::MODE_EVAL).ok());
  v1::ForwardResponse by_values, by_raw;
  ASSERT_TRUE(Forward("enc-1", Batch(4, 9, /*raw=*/false), &by_values).ok());
  ASSERT_TRUE(Forward("enc-1", Batch(4, 9, /*raw=*/true), &by_raw).ok());
  EXPECT_EQ(by_values.output().values_size(), 4 * kOut);
  EXPECT_TRUE(by_values.output().raw().empty());
  EXPECT_EQ(by_raw.output().values_size(), 0);
  EXPECT_EQ(by_raw.output().raw().size(), 4u * kOut * sizeof(float));
  EXPECT_EQ(std::vector<int64_t>(by_raw.output().shape().begin(), by_raw.output().shape().end()),
            (std::vector<int64_t>{4, kOut}));
  EXPECT_TRUE(BitEqual(Values(by_values.output()), Values(by_raw.output())));
  EXPECT_EQ(by_values.forward_id(), 0u);
  EXPECT_EQ(by_values.layer_stats_size(), 0);

  // Layer statistics in train mode: BatchNorm's output is standardised per channel, so over
  // the whole tensor mean ~ 0 and std ~ 1 while its input is not.
  ASSERT_TRUE(SetMode("enc-1", v1::MODE_TRAIN).ok());
  v1::ForwardResponse stats;
  ASSERT_TRUE(Forward("enc-1", Batch(64, 10, false, 3.0f), &stats, false, true).ok());
  ASSERT_EQ(stats.layer_stats_size(), 4);
  const v1::LayerStats& bn = stats.layer_stats(1);
  EXPECT_EQ(bn.index(), 1);
  EXPECT_EQ(bn.name(), "bn1");
  EXPECT_EQ(bn.kind(), "BatchNorm1d");
  EXPECT_NEAR(bn.output_mean(), 0.0f, 1e-3f);
  EXPECT_NEAR(bn.output_std(), 1.0f, 1e-2f);
  EXPECT_GT(std::fabs(bn.input_mean()) + std::fabs(bn.input_std() - 1.0f), 0.05f);
  EXPECT_EQ(stats.layer_stats(0).kind(), "Linear");
  EXPECT_EQ(stats.layer_stats(0).name(), "0");
  EXPECT_FLOAT_EQ(stats.layer_stats(1).input_mean(), stats.layer_stats(0).output_mean());
}

// --- Tensor validation and atomicity ------------------------------------------------------------

TEST_F(ServiceTest, BadTensorsAreInvalidAndChangeNothing) {
  Create("bad-t");
  const auto before = State("bad-t");
  const v1::Model model_before = Get("bad-t");
  v1::ForwardResponse f;
  v1::TrainStepResponse t;

  v1::Tensor both = Batch(2, 1);
  both.set_raw(std::string(2 * kIn * 4, '\0'));
  EXPECT_STATUS(Forward("bad-t", both, &f), StatusCode::INVALID_ARGUMENT, "both values and raw");
  v1::Tensor odd;
  odd.add_shape(1);
  odd.add_shape(1);
  odd.set_raw("abcde");
  EXPECT_STATUS(Forward("bad-t", odd, &f), StatusCode::INVALID_ARGUMENT, "not a multiple of 4");
  EXPECT_STATUS(Forward("bad-t", MakeTensor({3, kIn}, RandomValues(2 * kIn, 1)), &f),
                StatusCode::INVALID_ARGUMENT, "needs 96");
  EXPECT_STATUS(Forward("bad-t", MakeTensor({-2, kIn}, {}), &f), StatusCode::INVALID_ARGUMENT,
                "shape[0] must be >= 0");
  EXPECT_STATUS(Forward("bad-t", MakeTensor({2, kIn + 1}, RandomValues(2 * (kIn + 1), 1)), &f),
                StatusCode::INVALID_ARGUMENT, "expects");
  EXPECT_STATUS(Forward("bad-t", MakeTensor({0, kIn}, {}), &f), StatusCode::INVALID_ARGUMENT,
                "empty batch");
  std::vector<float> nan = RandomValues(4 * kIn, 2);
  nan[17] = std::nanf("");
  EXPECT_STATUS(Forward("bad-t", MakeTensor({4, kIn}, nan), &f), StatusCode::INVALID_ARGUMENT,
                "non-finite");
  EXPECT_STATUS(TrainStep("bad-t", MakeTensor({4, kIn}, nan), {0, 1, 2, 3}, &t),
                StatusCode::INVALID_ARGUMENT, "non-finite");
  // BatchNorm in training with one value per channel, PyTorch's rule.
  EXPECT_STATUS(Forward("bad-t", Batch(1, 3), &f), StatusCode::INVALID_ARGUMENT,
                "more than 1 value per channel");
  EXPECT_STATUS(TrainStep("bad-t", Batch(1, 3), {0}, &t), StatusCode::INVALID_ARGUMENT,
                "more than 1 value per channel");
  EXPECT_STATUS(TrainStep("bad-t", Batch(2, 3), {0, kOut}, &t), StatusCode::INVALID_ARGUMENT,
                "out of range");
  EXPECT_STATUS(TrainStep("bad-t", Batch(2, 3), {0}, &t), StatusCode::INVALID_ARGUMENT,
                "labels has 1 entries");
  v1::ForwardRequest no_input;
  no_input.set_model("bad-t");
  EXPECT_STATUS(stub_->Forward(Ctx().get(), no_input, &f), StatusCode::INVALID_ARGUMENT,
                "input is required");
  // A tensor larger than --max-batch-elements is refused before anything is allocated.
  EXPECT_STATUS(Forward("bad-t", MakeTensor({int64_t{1} << 40, kIn}, {}), &f),
                StatusCode::RESOURCE_EXHAUSTED, "limit");

  EXPECT_TRUE(StateEqual(before, State("bad-t")));
  EXPECT_EQ(Get("bad-t").SerializeAsString(), model_before.SerializeAsString());
}

// --- Backward, ApplyGradients, TrainStep --------------------------------------------------------

TEST_F(ServiceTest, ForwardBackwardApplyEqualsTrainStep) {
  // Two identical models; one trained by TrainStep, the other by the three-call protocol with
  // the gradient of the same loss computed by the same core function.
  Create("fbw-a");
  Create("fbw-b");
  for (int step = 0; step < 3; ++step) {
    const v1::Tensor x = Batch(16, 100 + step, /*raw=*/step % 2 == 1);
    const std::vector<int64_t> labels = RandomLabels(16, kOut, 200 + step);

    v1::TrainStepResponse ts;
    ASSERT_TRUE(TrainStep("fbw-a", x, labels, &ts).ok());
    EXPECT_EQ(ts.step(), static_cast<uint64_t>(step + 1));
    EXPECT_EQ(ts.samples(), 16);

    v1::ForwardResponse fr;
    ASSERT_TRUE(Forward("fbw-b", x, &fr, /*retain=*/true).ok());
    ASSERT_NE(fr.forward_id(), 0u);
    const std::vector<float> out = Values(fr.output());
    normd::Targets targets;
    targets.labels = labels.data();
    targets.num_labels = static_cast<int64_t>(labels.size());
    normd::Tensor grad;
    normd::ConstTensorView view{out.data(), normd::Shape{16, kOut}};
    const double loss = normd::ComputeLoss(normd::LossKind::kCrossEntropy, view, targets, &grad);
    EXPECT_DOUBLE_EQ(loss, ts.loss());

    v1::BackwardRequest br;
    br.set_model("fbw-b");
    br.set_forward_id(fr.forward_id());
    *br.mutable_grad_output() = MakeTensor(
        {16, kOut}, std::vector<float>(grad.data(), grad.data() + grad.size()), step % 2 == 1);
    br.set_return_grad_input(true);
    v1::BackwardResponse bresp;
    ASSERT_TRUE(stub_->Backward(Ctx().get(), br, &bresp).ok());
    EXPECT_EQ(Values(bresp.grad_input()).size(), 16u * kIn);
    EXPECT_EQ(bresp.grad_input().raw().empty(), step % 2 == 0);  // the request's encoding

    v1::ApplyGradientsRequest ar;
    ar.set_model("fbw-b");
    v1::ApplyGradientsResponse aresp;
    ASSERT_TRUE(stub_->ApplyGradients(Ctx().get(), ar, &aresp).ok());
    EXPECT_EQ(aresp.step(), static_cast<uint64_t>(step + 1));
    EXPECT_TRUE(StateEqual(State("fbw-a"), State("fbw-b"))) << "after step " << step;
  }
  EXPECT_TRUE(StateEqual(State("fbw-a"), State("fbw-b")));
  EXPECT_EQ(Get("fbw-a").step(), 3u);
  EXPECT_EQ(Get("fbw-b").step(), 3u);
}

TEST_F(ServiceTest, BackwardAccumulatesOverSeveralForwards) {
  Create("acc-a");
  Create("acc-b");
  const v1::Tensor x = Batch(8, 31);
  const auto initial = State("acc-a");
  // Model a: two Backward calls of gradient g each; model b: one of 2g. Same step.
  v1::ForwardResponse fa1, fa2, fb;
  ASSERT_TRUE(SetMode("acc-a", v1::MODE_EVAL).ok());  // no buffer updates between forwards
  ASSERT_TRUE(SetMode("acc-b", v1::MODE_EVAL).ok());
  ASSERT_TRUE(Forward("acc-a", x, &fa1, true).ok());
  ASSERT_TRUE(Forward("acc-a", x, &fa2, true).ok());
  ASSERT_TRUE(Forward("acc-b", x, &fb, true).ok());
  EXPECT_NE(fa1.forward_id(), fa2.forward_id());
  const std::vector<float> g = RandomValues(8 * kOut, 41, 0.25f);  // exact when doubled
  std::vector<float> g2 = g;
  for (float& v : g2) v *= 2.0f;
  auto backward = [&](const std::string& id, uint64_t fid, const std::vector<float>& grad) {
    v1::BackwardRequest br;
    br.set_model(id);
    br.set_forward_id(fid);
    *br.mutable_grad_output() = MakeTensor({8, kOut}, grad);
    v1::BackwardResponse resp;
    return stub_->Backward(Ctx().get(), br, &resp);
  };
  ASSERT_TRUE(backward("acc-a", fa1.forward_id(), g).ok());
  ASSERT_TRUE(backward("acc-a", fa2.forward_id(), g).ok());
  ASSERT_TRUE(backward("acc-b", fb.forward_id(), g2).ok());
  for (const char* id : {"acc-a", "acc-b"}) {
    v1::ApplyGradientsRequest ar;
    ar.set_model(id);
    v1::ApplyGradientsResponse resp;
    ASSERT_TRUE(stub_->ApplyGradients(Ctx().get(), ar, &resp).ok());
  }
  // Parameter gradients accumulate: v + v and 2v are the same floats (doubling is exact and
  // commutes with every operation of the backward pass), so the states are bit-identical.
  const auto a = State("acc-a"), b = State("acc-b");
  EXPECT_TRUE(StateEqual(a, b));
  EXPECT_FALSE(BitEqual(a.at("0.weight"), initial.at("0.weight")));  // the step did move
}

TEST_F(ServiceTest, ForwardIdErrors) {
  Create("fid-1");
  auto backward = [&](uint64_t fid, const v1::Tensor& grad) {
    v1::BackwardRequest br;
    br.set_model("fid-1");
    br.set_forward_id(fid);
    *br.mutable_grad_output() = grad;
    v1::BackwardResponse resp;
    return stub_->Backward(Ctx().get(), br, &resp);
  };
  const v1::Tensor grad = MakeTensor({4, kOut}, RandomValues(4 * kOut, 3, 0.1f));
  v1::ApplyGradientsRequest ar;
  ar.set_model("fid-1");
  v1::ApplyGradientsResponse aresp;
  EXPECT_STATUS(stub_->ApplyGradients(Ctx().get(), ar, &aresp), StatusCode::FAILED_PRECONDITION,
                "no accumulated gradients");
  EXPECT_STATUS(backward(12345, grad), StatusCode::FAILED_PRECONDITION, "unknown");
  EXPECT_STATUS(backward(0, grad), StatusCode::FAILED_PRECONDITION, "forward_id 0");

  v1::ForwardResponse f;
  ASSERT_TRUE(Forward("fid-1", Batch(4, 1), &f, true).ok());
  // A mis-shaped gradient is a bad argument; the forward stays usable.
  EXPECT_STATUS(backward(f.forward_id(), MakeTensor({4, kOut - 1}, RandomValues(4 * 9, 1))),
                StatusCode::INVALID_ARGUMENT, "grad_output has shape");
  ASSERT_TRUE(backward(f.forward_id(), grad).ok());
  EXPECT_STATUS(backward(f.forward_id(), grad), StatusCode::FAILED_PRECONDITION,
                "released by its Backward");

  // Stale after a step.
  ASSERT_TRUE(Forward("fid-1", Batch(4, 2), &f, true).ok());
  v1::TrainStepResponse t;
  ASSERT_TRUE(TrainStep("fid-1", Batch(4, 5), {1, 2, 3, 4}, &t).ok());
  EXPECT_STATUS(backward(f.forward_id(), grad), StatusCode::FAILED_PRECONDITION,
                "parameters changed");
  EXPECT_STATUS(backward(f.forward_id(), grad), StatusCode::FAILED_PRECONDITION,
                "no longer retained");
  // Stale after a mode switch.
  ASSERT_TRUE(Forward("fid-1", Batch(4, 2), &f, true).ok());
  ASSERT_TRUE(SetMode("fid-1", v1::MODE_EVAL).ok());
  EXPECT_STATUS(backward(f.forward_id(), grad), StatusCode::FAILED_PRECONDITION, "switched mode");
  // Released by ResetRunningStats.
  ASSERT_TRUE(Forward("fid-1", Batch(4, 2), &f, true).ok());
  v1::ResetRunningStatsRequest rr;
  rr.set_model("fid-1");
  v1::Model rm;
  ASSERT_TRUE(stub_->ResetRunningStats(Ctx().get(), rr, &rm).ok());
  EXPECT_STATUS(backward(f.forward_id(), grad), StatusCode::FAILED_PRECONDITION,
                "ResetRunningStats");

  // At most --max-retained-forwards (4) held at once; the refused forward changes nothing.
  ASSERT_TRUE(SetMode("fid-1", v1::MODE_TRAIN).ok());
  for (int i = 0; i < 4; ++i) ASSERT_TRUE(Forward("fid-1", Batch(4, 10 + i), &f, true).ok());
  const auto before = State("fid-1");
  EXPECT_STATUS(Forward("fid-1", Batch(4, 20), &f, true), StatusCode::RESOURCE_EXHAUSTED,
                "retains 4 forwards");
  EXPECT_TRUE(StateEqual(before, State("fid-1")));
  // They expire after --retained-forward-timeout (2 s).
  const uint64_t last = f.forward_id();
  std::this_thread::sleep_for(std::chrono::milliseconds(2300));
  EXPECT_STATUS(backward(last, grad), StatusCode::FAILED_PRECONDITION, "expired");
  ASSERT_TRUE(Forward("fid-1", Batch(4, 21), &f, true).ok());
}

TEST_F(ServiceTest, TrainStepLearnsAndCounts) {
  Create("learn-1", MlpSpec(kIn, 64, kOut, 3, 0.1f));
  // A learnable task: the label is the arg-max of the first kOut features.
  const int n = 128;
  std::vector<float> x = RandomValues(n * kIn, 77);
  std::vector<int64_t> y(n);
  for (int i = 0; i < n; ++i) {
    y[i] = std::max_element(&x[i * kIn], &x[i * kIn] + kOut) - &x[i * kIn];
  }
  const v1::Tensor batch = MakeTensor({n, kIn}, x, true);
  v1::TrainStepResponse first, last;
  for (int s = 0; s < 60; ++s) {
    v1::TrainStepResponse r;
    ASSERT_TRUE(TrainStep("learn-1", batch, y, &r).ok());
    EXPECT_EQ(r.step(), static_cast<uint64_t>(s + 1));
    EXPECT_EQ(r.samples(), n);
    if (s == 0) first = r;
    last = r;
  }
  EXPECT_LT(last.loss(), 0.5 * first.loss());
  const v1::Model m = Get("learn-1");
  EXPECT_EQ(m.step(), 60u);
  EXPECT_EQ(m.batch_norms(0).num_batches_tracked(), 60u);
  EXPECT_GT(m.batch_norms(0).running_mean_update_norm(), 0.0f);

  // Evaluate: loss and accuracy in eval semantics, nothing changes, whatever the mode.
  const auto before = State("learn-1");
  v1::EvaluateRequest er;
  er.set_model("learn-1");
  *er.mutable_input() = batch;
  *er.mutable_labels() = {y.begin(), y.end()};
  v1::EvaluateResponse eval1, eval2;
  ASSERT_TRUE(stub_->Evaluate(Ctx().get(), er, &eval1).ok());
  ASSERT_TRUE(stub_->Evaluate(Ctx().get(), er, &eval2).ok());
  EXPECT_EQ(eval1.samples(), n);
  EXPECT_GT(eval1.accuracy(), 0.5);
  EXPECT_LE(eval1.accuracy(), 1.0);
  EXPECT_EQ(eval1.loss(), eval2.loss());
  EXPECT_TRUE(StateEqual(before, State("learn-1")));
  EXPECT_EQ(Get("learn-1").mode(), v1::MODE_TRAIN);
  er.clear_labels();
  EXPECT_STATUS(stub_->Evaluate(Ctx().get(), er, &eval1), StatusCode::INVALID_ARGUMENT, "labels");
}

TEST_F(ServiceTest, MseTargetsAndErrors) {
  v1::ModelSpec spec = MlpSpec(kIn, 16, 3);
  spec.set_loss(v1::LOSS_MSE);
  Create("mse-1", spec);
  v1::TrainStepRequest req;
  req.set_model("mse-1");
  *req.mutable_input() = Batch(8, 1);
  *req.mutable_target() = MakeTensor({8, 3}, RandomValues(24, 2));
  v1::TrainStepResponse r;
  ASSERT_TRUE(stub_->TrainStep(Ctx().get(), req, &r).ok());
  EXPECT_GT(r.loss(), 0.0);
  *req.mutable_target() = MakeTensor({8, 4}, RandomValues(32, 2));
  EXPECT_STATUS(stub_->TrainStep(Ctx().get(), req, &r), StatusCode::INVALID_ARGUMENT,
                "target has shape");
  std::vector<float> inf = RandomValues(24, 2);
  inf[3] = INFINITY;
  *req.mutable_target() = MakeTensor({8, 3}, inf);
  EXPECT_STATUS(stub_->TrainStep(Ctx().get(), req, &r), StatusCode::INVALID_ARGUMENT,
                "non-finite");
  req.add_labels(1);
  EXPECT_STATUS(stub_->TrainStep(Ctx().get(), req, &r), StatusCode::INVALID_ARGUMENT,
                "both set");
}

TEST_F(ServiceTest, TrainStreamAnswersInOrderAndStopsAtTheFirstError) {
  Create("stream-1");
  {
    auto ctx = Ctx();
    auto stream = stub_->TrainStream(ctx.get());
    for (int i = 0; i < 5; ++i) {
      v1::TrainStepRequest req;
      req.set_model("stream-1");
      *req.mutable_input() = Batch(8, 300 + i, i % 2 == 0);
      const std::vector<int64_t> labels = RandomLabels(8, kOut, 400 + i);
      *req.mutable_labels() = {labels.begin(), labels.end()};
      ASSERT_TRUE(stream->Write(req));
    }
    stream->WritesDone();
    v1::TrainStepResponse resp;
    uint64_t expected = 1;
    while (stream->Read(&resp)) {
      EXPECT_EQ(resp.step(), expected++);
      EXPECT_EQ(resp.samples(), 8);
    }
    EXPECT_EQ(expected, 6u);
    EXPECT_TRUE(stream->Finish().ok());
  }
  {
    auto ctx = Ctx();
    auto stream = stub_->TrainStream(ctx.get());
    for (int i = 0; i < 4; ++i) {
      v1::TrainStepRequest req;
      req.set_model("stream-1");
      *req.mutable_input() = Batch(8, 500 + i);
      std::vector<int64_t> labels = RandomLabels(8, kOut, 600 + i);
      if (i == 2) labels[5] = -1;  // the third message is bad
      *req.mutable_labels() = {labels.begin(), labels.end()};
      if (!stream->Write(req)) break;  // the server may already have ended the stream
    }
    stream->WritesDone();
    v1::TrainStepResponse resp;
    int answered = 0;
    while (stream->Read(&resp)) ++answered;
    EXPECT_EQ(answered, 2);
    const grpc::Status s = stream->Finish();
    EXPECT_EQ(s.error_code(), StatusCode::INVALID_ARGUMENT);
    EXPECT_NE(s.error_message().find("labels[5] = -1"), std::string::npos) << s.error_message();
  }
  EXPECT_EQ(Get("stream-1").step(), 7u);
}

// --- State ---------------------------------------------------------------------------------------

TEST_F(ServiceTest, GetStateSetStateRoundTrip) {
  Create("st-a", MlpSpec(kIn, 64, kOut, 11));
  Create("st-b", MlpSpec(kIn, 64, kOut, 12));
  v1::TrainStepResponse t;
  for (int i = 0; i < 3; ++i) {
    ASSERT_TRUE(TrainStep("st-a", Batch(16, 50 + i), RandomLabels(16, kOut, 60 + i), &t).ok());
  }
  v1::GetStateRequest gr;
  gr.set_model("st-a");
  v1::ModelState without_opt, with_opt;
  ASSERT_TRUE(stub_->GetState(Ctx().get(), gr, &without_opt).ok());
  gr.set_include_optimizer(true);
  ASSERT_TRUE(stub_->GetState(Ctx().get(), gr, &with_opt).ok());
  std::set<std::string> names;
  for (const auto& nt : without_opt.tensors()) names.insert(nt.name());
  EXPECT_EQ(names, (std::set<std::string>{"0.weight", "0.bias", "1.weight", "1.bias",
                                          "1.running_mean", "1.running_var",
                                          "1.num_batches_tracked", "3.weight", "3.bias"}));
  for (const auto& nt : without_opt.tensors()) {
    if (nt.name() == "1.num_batches_tracked") {
      EXPECT_EQ(nt.tensor().shape_size(), 0);  // 0-d, like PyTorch
      EXPECT_EQ(Values(nt.tensor()), std::vector<float>{3.0f});
    }
  }
  bool has_momentum = false;
  for (const auto& nt : with_opt.tensors()) {
    has_momentum = has_momentum || nt.name() == "optimizer.0.weight.momentum_buffer";
  }
  EXPECT_TRUE(has_momentum);

  v1::SetStateRequest sr;
  sr.set_model("st-b");
  *sr.mutable_state() = with_opt;
  sr.set_strict(true);
  v1::Model m;
  ASSERT_TRUE(stub_->SetState(Ctx().get(), sr, &m).ok());
  EXPECT_TRUE(StateEqual(State("st-a"), State("st-b")));
  ASSERT_TRUE(SetMode("st-a", v1::MODE_EVAL).ok());
  ASSERT_TRUE(SetMode("st-b", v1::MODE_EVAL).ok());
  v1::ForwardResponse fa, fb;
  ASSERT_TRUE(Forward("st-a", Batch(5, 70), &fa).ok());
  ASSERT_TRUE(Forward("st-b", Batch(5, 70), &fb).ok());
  EXPECT_TRUE(BitEqual(Values(fa.output()), Values(fb.output())));

  // Errors change nothing.
  const auto before = State("st-b");
  auto set = [&](const v1::ModelState& st, bool strict) {
    v1::SetStateRequest r;
    r.set_model("st-b");
    *r.mutable_state() = st;
    r.set_strict(strict);
    v1::Model out;
    return stub_->SetState(Ctx().get(), r, &out);
  };
  v1::ModelState bad;
  auto* e = bad.add_tensors();
  e->set_name("9.weight");
  *e->mutable_tensor() = MakeTensor({1}, {1.0f});
  EXPECT_STATUS(set(bad, false), StatusCode::INVALID_ARGUMENT, "'9.weight'");
  e->set_name("3.bias");
  *e->mutable_tensor() = MakeTensor({kOut + 1}, std::vector<float>(kOut + 1, 0.0f));
  EXPECT_STATUS(set(bad, false), StatusCode::INVALID_ARGUMENT, "shape");
  std::vector<float> nan(kOut, 0.0f);
  nan[2] = std::nanf("");
  *e->mutable_tensor() = MakeTensor({kOut}, nan);
  EXPECT_STATUS(set(bad, false), StatusCode::INVALID_ARGUMENT, "non-finite");
  *e->mutable_tensor() = MakeTensor({kOut}, std::vector<float>(kOut, 0.5f));
  EXPECT_STATUS(set(bad, true), StatusCode::INVALID_ARGUMENT, "missing");
  EXPECT_TRUE(StateEqual(before, State("st-b")));
  // A partial, non-strict set writes just that entry.
  ASSERT_TRUE(set(bad, false).ok());
  EXPECT_EQ(State("st-b").at("3.bias"), std::vector<float>(kOut, 0.5f));
}

TEST_F(ServiceTest, ResetRunningStats) {
  Create("reset-1");
  v1::ForwardResponse f;
  ASSERT_TRUE(Forward("reset-1", Batch(16, 1, false, 2.0f), &f).ok());
  ASSERT_NE(State("reset-1").at("1.running_mean"), std::vector<float>(64, 0.0f));
  v1::ResetRunningStatsRequest req;
  req.set_model("reset-1");
  v1::Model m;
  ASSERT_TRUE(stub_->ResetRunningStats(Ctx().get(), req, &m).ok());
  EXPECT_EQ(m.batch_norms(0).num_batches_tracked(), 0u);
  const auto st = State("reset-1");
  EXPECT_EQ(st.at("1.running_mean"), std::vector<float>(64, 0.0f));
  EXPECT_EQ(st.at("1.running_var"), std::vector<float>(64, 1.0f));
  EXPECT_EQ(st.at("1.num_batches_tracked"), std::vector<float>{0.0f});
}

TEST_F(ServiceTest, UpdateOptimizerKeepsStateAndValidates) {
  Create("opt-1");
  v1::TrainStepResponse t;
  ASSERT_TRUE(TrainStep("opt-1", Batch(8, 1), RandomLabels(8, kOut, 1), &t).ok());
  const auto before = State("opt-1");
  v1::UpdateOptimizerRequest req;
  req.set_model("opt-1");
  req.mutable_optimizer()->mutable_sgd()->set_lr(0.001f);
  req.mutable_optimizer()->mutable_sgd()->set_momentum(0.9f);
  v1::Model m;
  ASSERT_TRUE(stub_->UpdateOptimizer(Ctx().get(), req, &m).ok());
  EXPECT_FLOAT_EQ(m.spec().optimizer().sgd().lr(), 0.001f);
  EXPECT_FLOAT_EQ(Get("opt-1").spec().optimizer().sgd().lr(), 0.001f);
  EXPECT_TRUE(StateEqual(before, State("opt-1")));  // momentum buffers kept

  req.mutable_optimizer()->mutable_adam()->set_lr(0.01f);
  EXPECT_STATUS(stub_->UpdateOptimizer(Ctx().get(), req, &m), StatusCode::INVALID_ARGUMENT,
                "kind cannot change");
  req.mutable_optimizer()->mutable_sgd()->set_lr(-1.0f);
  EXPECT_STATUS(stub_->UpdateOptimizer(Ctx().get(), req, &m), StatusCode::INVALID_ARGUMENT,
                "optimizer.sgd.lr must be > 0");
  req.clear_optimizer();
  EXPECT_STATUS(stub_->UpdateOptimizer(Ctx().get(), req, &m), StatusCode::INVALID_ARGUMENT,
                "optimizer must be set");
  EXPECT_FLOAT_EQ(Get("opt-1").spec().optimizer().sgd().lr(), 0.001f);
}

TEST_F(ServiceTest, SaveModelIsDurable) {
  Create("save-1");
  v1::TrainStepResponse t;
  ASSERT_TRUE(TrainStep("save-1", Batch(8, 1), RandomLabels(8, kOut, 1), &t).ok());
  v1::SaveModelRequest req;
  req.set_model("save-1");
  v1::SaveModelResponse resp;
  ASSERT_TRUE(stub_->SaveModel(Ctx().get(), req, &resp).ok());
  EXPECT_EQ(resp.step(), 1u);
  // The checkpoint is on disk when the call returns.
  bool found = false;
  for (const auto& f : std::filesystem::directory_iterator(server_->dir() + "/data/save-1")) {
    found = found || f.path().extension() == ".nckpt";
  }
  EXPECT_TRUE(found);
  req.set_model("nope");
  EXPECT_STATUS(stub_->SaveModel(Ctx().get(), req, &resp), StatusCode::NOT_FOUND, "nope");
}

// --- Concurrency ---------------------------------------------------------------------------------

TEST_F(ServiceTest, ConcurrentClientsOnOneModelAndOnMany) {
  // One model in eval mode, read by 8 clients at once: every answer equals the reference.
  Create("conc-eval");
  v1::ForwardResponse warm;
  ASSERT_TRUE(Forward("conc-eval", Batch(32, 1), &warm).ok());
  ASSERT_TRUE(SetMode("conc-eval", v1::MODE_EVAL).ok());
  const v1::Tensor x = Batch(4, 2);
  v1::ForwardResponse ref;
  ASSERT_TRUE(Forward("conc-eval", x, &ref).ok());
  const std::vector<float> expected = Values(ref.output());

  // Meanwhile 4 clients train 4 other models.
  for (int m = 0; m < 4; ++m) Create("conc-train-" + std::to_string(m));
  std::atomic<int> mismatches{0}, errors{0};
  // The first failure's status, for the failure message.
  std::mutex first_error_mu;
  std::string first_error;
  auto failed = [&](const char* rpc, const grpc::Status& st) {
    ++errors;
    std::lock_guard<std::mutex> lock(first_error_mu);
    if (first_error.empty()) {
      first_error = std::string(rpc) + ": code " + std::to_string(st.error_code()) + ", " +
                    st.error_message();
    }
  };
  // Each client opens a channel of its own; wait_for_ready lets a call wait for that channel's
  // connection (slow under the sanitizers) rather than fail fast: this test is about how the
  // server serves concurrent calls, and a refusal or a deadline still counts as an error.
  auto ready_ctx = [] {
    auto ctx = Ctx();
    ctx->set_wait_for_ready(true);
    return ctx;
  };
  std::vector<std::thread> threads;
  for (int c = 0; c < 8; ++c) {
    threads.emplace_back([&] {
      auto stub = server_->NewStub();
      for (int i = 0; i < 40; ++i) {
        v1::ForwardRequest req;
        req.set_model("conc-eval");
        *req.mutable_input() = x;
        v1::ForwardResponse resp;
        const grpc::Status st = stub->Forward(ready_ctx().get(), req, &resp);
        if (!st.ok()) {
          failed("Forward", st);
        } else if (!BitEqual(Values(resp.output()), expected)) {
          ++mismatches;
        }
      }
    });
  }
  std::vector<int> acked(4, 0);
  for (int m = 0; m < 4; ++m) {
    threads.emplace_back([&, m] {
      auto stub = server_->NewStub();
      for (int i = 0; i < 15; ++i) {
        v1::TrainStepRequest req;
        req.set_model("conc-train-" + std::to_string(m));
        *req.mutable_input() = Batch(16, 1000 * m + i);
        const std::vector<int64_t> labels = RandomLabels(16, kOut, i);
        *req.mutable_labels() = {labels.begin(), labels.end()};
        v1::TrainStepResponse resp;
        const grpc::Status st = stub->TrainStep(ready_ctx().get(), req, &resp);
        if (st.ok()) {
          ++acked[m];
        } else {
          failed("TrainStep", st);
        }
      }
    });
  }
  // And two clients hammer one training model concurrently: steps serialise.
  std::atomic<int> shared_acked{0};
  Create("conc-shared");
  for (int c = 0; c < 2; ++c) {
    threads.emplace_back([&, c] {
      auto stub = server_->NewStub();
      for (int i = 0; i < 10; ++i) {
        v1::TrainStepRequest req;
        req.set_model("conc-shared");
        *req.mutable_input() = Batch(8, 77 * c + i);
        const std::vector<int64_t> labels = RandomLabels(8, kOut, i);
        *req.mutable_labels() = {labels.begin(), labels.end()};
        v1::TrainStepResponse resp;
        if (stub->TrainStep(ready_ctx().get(), req, &resp).ok()) ++shared_acked;
      }
    });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(errors.load(), 0) << "first: " << first_error;
  EXPECT_EQ(mismatches.load(), 0);
  for (int m = 0; m < 4; ++m) {
    EXPECT_EQ(Get("conc-train-" + std::to_string(m)).step(), static_cast<uint64_t>(acked[m]));
    EXPECT_EQ(acked[m], 15);
  }
  EXPECT_EQ(Get("conc-shared").step(), static_cast<uint64_t>(shared_acked.load()));
  EXPECT_EQ(Get("conc-shared").batch_norms(0).num_batches_tracked(),
            static_cast<uint64_t>(shared_acked.load()));
}

}  // namespace
}  // namespace normd::testing
