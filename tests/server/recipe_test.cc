// The training recipe over gRPC against the real normd: learning-rate schedules, gradient
// clipping, label smoothing and no-decay parameter groups set at CreateModel and by
// UpdateOptimizer; bad values refused with INVALID_ARGUMENT changing nothing; grad_norm and
// learning_rate in TrainStep, TrainStream and ApplyGradients responses and in GetModel; the
// normd_grad_norm / normd_learning_rate gauges; the schedule's progress across a restart.
#include <gtest/gtest.h>
#include <signal.h>
#include <stdlib.h>

#include <cmath>
#include <filesystem>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "core/loss.h"
#include "tests/server/normd_process.h"
#include "tests/server/shared_normd_test.h"

namespace normd::testing {
namespace {

using grpc::StatusCode;

constexpr int kIn = 32;
constexpr int kOut = 10;

#define EXPECT_STATUS(expr, code, substring)                                    \
  do {                                                                          \
    const grpc::Status st_ = (expr);                                            \
    EXPECT_EQ(st_.error_code(), (code)) << st_.error_message();                 \
    EXPECT_NE(st_.error_message().find(substring), std::string::npos)           \
        << "message: " << st_.error_message();                                  \
  } while (0)

// MlpSpec with SGD(lr 0.05, momentum 0.9), a warm-up of 3 steps from 0.2 * lr then a cosine
// over 10 steps to 0.005, clipping at 1.0, label smoothing 0.1 and the no-decay groups.
v1::ModelSpec RecipeSpec() {
  v1::ModelSpec spec = MlpSpec(kIn, 64, kOut, /*seed=*/3, /*lr=*/0.05f);
  v1::OptimizerSpec* o = spec.mutable_optimizer();
  o->mutable_sgd()->set_weight_decay(1e-3f);
  v1::LrScheduleSpec* s = o->mutable_lr_schedule();
  s->mutable_warmup()->set_steps(3);
  s->mutable_warmup()->set_start_factor(0.2);
  s->mutable_cosine()->set_t_max(10);
  s->mutable_cosine()->set_eta_min(0.005);
  o->mutable_clip_grad_norm()->set_max_norm(1.0);
  o->set_no_weight_decay_on_norm_and_bias(true);
  spec.mutable_loss_options()->set_label_smoothing(0.1);
  return spec;
}

// The rate of step t (0-based) under RecipeSpec's schedule with base lr `base`.
double RecipeLr(double base, int t) {
  if (t < 3) return base * (0.2 + 0.8 * t / 3.0);
  return 0.005 + (base - 0.005) * (1 + std::cos(M_PI * (t - 3) / 10.0)) / 2;
}

class RecipeTest : public SharedNormdTest<RecipeTest> {
 protected:
  grpc::Status Create(const std::string& id, const v1::ModelSpec& spec, v1::Model* m = nullptr) {
    v1::CreateModelRequest req;
    req.set_id(id);
    *req.mutable_spec() = spec;
    v1::Model ignored;
    return stub_->CreateModel(Ctx().get(), req, m != nullptr ? m : &ignored);
  }
  grpc::Status Update(const std::string& id, const v1::OptimizerSpec& o, v1::Model* m = nullptr) {
    v1::UpdateOptimizerRequest req;
    req.set_model(id);
    *req.mutable_optimizer() = o;
    v1::Model ignored;
    return stub_->UpdateOptimizer(Ctx().get(), req, m != nullptr ? m : &ignored);
  }
  v1::TrainStepResponse Train(const std::string& id, uint64_t seed, int n = 16) {
    v1::TrainStepRequest req;
    req.set_model(id);
    *req.mutable_input() = Batch(n, seed);
    for (int64_t l : RandomLabels(n, kOut, seed)) req.add_labels(l);
    v1::TrainStepResponse resp;
    const grpc::Status s = stub_->TrainStep(Ctx().get(), req, &resp);
    EXPECT_TRUE(s.ok()) << s.error_message();
    return resp;
  }
  v1::Model Get(const std::string& id) {
    v1::GetModelRequest req;
    req.set_model(id);
    v1::Model m;
    const grpc::Status s = stub_->GetModel(Ctx().get(), req, &m);
    EXPECT_TRUE(s.ok()) << s.error_message();
    return m;
  }
  static v1::Tensor Batch(int n, uint64_t seed) {
    return MakeTensor({n, kIn}, RandomValues(static_cast<size_t>(n) * kIn, seed), true);
  }
};

bool SameState(const std::map<std::string, std::vector<float>>& a,
               const std::map<std::string, std::vector<float>>& b) {
  if (a.size() != b.size()) return false;
  for (const auto& [name, v] : a) {
    auto it = b.find(name);
    if (it == b.end() || !BitEqual(v, it->second)) return false;
  }
  return true;
}

TEST_F(RecipeTest, ScheduleClippingAndSmoothingAtCreation) {
  v1::Model m;
  ASSERT_TRUE(Create("r-create", RecipeSpec(), &m).ok());
  EXPECT_DOUBLE_EQ(m.learning_rate(), RecipeLr(0.05f, 0));
  EXPECT_EQ(m.spec().SerializeAsString(), RecipeSpec().SerializeAsString());
  bool clipped = false;
  for (int t = 0; t < 16; ++t) {
    const v1::TrainStepResponse r = Train("r-create", 100 + t);
    EXPECT_EQ(r.step(), static_cast<uint64_t>(t + 1));
    EXPECT_NEAR(r.learning_rate(), RecipeLr(0.05f, t), 1e-15) << "step " << t;
    EXPECT_GT(r.grad_norm(), 0.0);
    clipped = clipped || r.grad_norm() > 1.0;
    EXPECT_NEAR(Get("r-create").learning_rate(), RecipeLr(0.05f, t + 1), 1e-15);
  }
  EXPECT_TRUE(clipped) << "no step's gradient norm exceeded max_norm: clipping untested";
  EXPECT_EQ(State("r-create").at("optimizer.lr_scheduler.last_epoch"),
            std::vector<float>{16.0f});
}

TEST_F(RecipeTest, LabelSmoothingIsTheLossOfTrainStepAndEvaluate) {
  v1::ModelSpec spec = MlpSpec(kIn, 64, kOut, 4);
  spec.mutable_loss_options()->set_label_smoothing(0.25);
  ASSERT_TRUE(Create("r-smooth", spec).ok());
  // Evaluate in eval mode against the core's loss on the model's own eval output.
  v1::SetModeRequest mode;
  mode.set_model("r-smooth");
  mode.set_mode(v1::MODE_EVAL);
  v1::Model ignored;
  ASSERT_TRUE(stub_->SetMode(Ctx().get(), mode, &ignored).ok());
  const std::vector<int64_t> labels = RandomLabels(8, kOut, 9);
  v1::ForwardRequest f;
  f.set_model("r-smooth");
  *f.mutable_input() = Batch(8, 9);
  v1::ForwardResponse out;
  ASSERT_TRUE(stub_->Forward(Ctx().get(), f, &out).ok());
  const std::vector<float> logits = Values(out.output());
  Targets t;
  t.labels = labels.data();
  t.num_labels = 8;
  const double want =
      ComputeLoss(LossKind::kCrossEntropy, ConstTensorView{logits.data(), Shape{8, kOut}}, t,
                  nullptr, 0.25);
  v1::EvaluateRequest e;
  e.set_model("r-smooth");
  *e.mutable_input() = Batch(8, 9);
  *e.mutable_labels() = {labels.begin(), labels.end()};
  v1::EvaluateResponse er;
  ASSERT_TRUE(stub_->Evaluate(Ctx().get(), e, &er).ok());
  EXPECT_DOUBLE_EQ(er.loss(), want);
  EXPECT_NE(er.loss(), ComputeLoss(LossKind::kCrossEntropy,
                                   ConstTensorView{logits.data(), Shape{8, kOut}}, t, nullptr));
}

TEST_F(RecipeTest, BadValuesAreInvalidArgumentAndCreateNothing) {
  struct BadCase {
    std::string want;
    std::function<void(v1::ModelSpec*)> edit;
  };
  const std::vector<BadCase> cases = {
      {"spec.optimizer.clip_grad_norm.max_norm must be > 0, got -1",
       [](v1::ModelSpec* s) { s->mutable_optimizer()->mutable_clip_grad_norm()->set_max_norm(-1); }},
      {"spec.optimizer.clip_grad_norm.max_norm must be > 0, got 0 (an unset max_norm",
       [](v1::ModelSpec* s) { s->mutable_optimizer()->mutable_clip_grad_norm(); }},
      {"spec.optimizer.clip_grad_norm.max_norm must be > 0, got nan",
       [](v1::ModelSpec* s) {
         s->mutable_optimizer()->mutable_clip_grad_norm()->set_max_norm(std::nan(""));
       }},
      {"spec.optimizer.lr_schedule.cosine.t_max must be >= 1, got 0",
       [](v1::ModelSpec* s) { s->mutable_optimizer()->mutable_lr_schedule()->mutable_cosine(); }},
      {"spec.optimizer.lr_schedule.cosine.eta_min must be >= 0, got -0.1",
       [](v1::ModelSpec* s) {
         auto* c = s->mutable_optimizer()->mutable_lr_schedule()->mutable_cosine();
         c->set_t_max(5);
         c->set_eta_min(-0.1);
       }},
      {"spec.optimizer.lr_schedule.step.step_size must be >= 1, got 0",
       [](v1::ModelSpec* s) { s->mutable_optimizer()->mutable_lr_schedule()->mutable_step(); }},
      {"spec.optimizer.lr_schedule.step.gamma must be >= 0, got -0.5",
       [](v1::ModelSpec* s) {
         auto* st = s->mutable_optimizer()->mutable_lr_schedule()->mutable_step();
         st->set_step_size(3);
         st->set_gamma(-0.5);
       }},
      {"spec.optimizer.lr_schedule.warmup.steps must be >= 1, got 0",
       [](v1::ModelSpec* s) { s->mutable_optimizer()->mutable_lr_schedule()->mutable_warmup(); }},
      {"spec.optimizer.lr_schedule.warmup.start_factor must be in (0, 1], got 0",
       [](v1::ModelSpec* s) {
         auto* w = s->mutable_optimizer()->mutable_lr_schedule()->mutable_warmup();
         w->set_steps(3);
         w->set_start_factor(0.0);
       }},
      {"spec.optimizer.lr_schedule.warmup.start_factor must be in (0, 1], got 1.5",
       [](v1::ModelSpec* s) {
         auto* w = s->mutable_optimizer()->mutable_lr_schedule()->mutable_warmup();
         w->set_steps(3);
         w->set_start_factor(1.5);
       }},
      {"spec.loss_options: label_smoothing must be in [0, 1), got 1",
       [](v1::ModelSpec* s) { s->mutable_loss_options()->set_label_smoothing(1.0); }},
      {"spec.loss_options: label_smoothing must be in [0, 1), got -0.1",
       [](v1::ModelSpec* s) { s->mutable_loss_options()->set_label_smoothing(-0.1); }},
      {"spec.loss_options: label_smoothing applies to cross-entropy only",
       [](v1::ModelSpec* s) {
         s->set_loss(v1::LOSS_MSE);
         s->mutable_loss_options()->set_label_smoothing(0.1);
       }},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    v1::ModelSpec spec = MlpSpec();
    cases[i].edit(&spec);
    const std::string id = "r-bad-" + std::to_string(i);
    EXPECT_STATUS(Create(id, spec), StatusCode::INVALID_ARGUMENT, cases[i].want);
    v1::GetModelRequest req;
    req.set_model(id);
    v1::Model m;
    EXPECT_EQ(stub_->GetModel(Ctx().get(), req, &m).error_code(), StatusCode::NOT_FOUND) << id;
  }
}

TEST_F(RecipeTest, BadUpdatesAreInvalidArgumentAndChangeNothing) {
  ASSERT_TRUE(Create("r-badupd", RecipeSpec()).ok());
  for (int t = 0; t < 4; ++t) Train("r-badupd", 200 + t);
  const v1::Model before = Get("r-badupd");
  const auto state = State("r-badupd");
  std::vector<std::pair<std::string, v1::OptimizerSpec>> bad;
  v1::OptimizerSpec o = RecipeSpec().optimizer();
  o.mutable_clip_grad_norm()->set_max_norm(-2.0);
  bad.emplace_back("optimizer.clip_grad_norm.max_norm must be > 0, got -2", o);
  o = RecipeSpec().optimizer();
  o.mutable_lr_schedule()->mutable_cosine()->set_t_max(0);
  bad.emplace_back("optimizer.lr_schedule.cosine.t_max must be >= 1, got 0", o);
  o = RecipeSpec().optimizer();
  o.mutable_lr_schedule()->mutable_warmup()->set_start_factor(HUGE_VAL);
  bad.emplace_back("optimizer.lr_schedule.warmup.start_factor must be in (0, 1]", o);
  o = RecipeSpec().optimizer();
  o.mutable_lr_schedule()->mutable_step()->set_step_size(-4);
  bad.emplace_back("optimizer.lr_schedule.step.step_size must be >= 1, got -4", o);
  for (const auto& [want, spec] : bad) {
    EXPECT_STATUS(Update("r-badupd", spec), StatusCode::INVALID_ARGUMENT, want);
  }
  const v1::Model after = Get("r-badupd");
  EXPECT_EQ(after.SerializeAsString(), before.SerializeAsString());
  EXPECT_TRUE(SameState(state, State("r-badupd")));
}

TEST_F(RecipeTest, UpdateOptimizerChangesTheSchedule) {
  ASSERT_TRUE(Create("r-upd", MlpSpec(kIn, 64, kOut, 5, 0.1f)).ok());
  for (int t = 0; t < 3; ++t) {
    const v1::TrainStepResponse r = Train("r-upd", 300 + t);
    EXPECT_DOUBLE_EQ(r.learning_rate(), static_cast<double>(0.1f));  // no schedule: the lr
  }
  EXPECT_EQ(State("r-upd").count("optimizer.lr_scheduler.last_epoch"), 0u);

  // Add StepLR(step_size 2, gamma 0.5): a new schedule starts at its step 0.
  v1::OptimizerSpec o = Get("r-upd").spec().optimizer();
  o.mutable_lr_schedule()->mutable_step()->set_step_size(2);
  o.mutable_lr_schedule()->mutable_step()->set_gamma(0.5);
  v1::Model m;
  ASSERT_TRUE(Update("r-upd", o, &m).ok());
  EXPECT_DOUBLE_EQ(m.learning_rate(), static_cast<double>(0.1f));
  EXPECT_EQ(m.spec().optimizer().lr_schedule().step().step_size(), 2);
  const double base = 0.1f;
  const double want[] = {base, base, base * 0.5, base * 0.5, base * 0.25};
  for (int t = 0; t < 5; ++t) {
    EXPECT_DOUBLE_EQ(Train("r-upd", 400 + t).learning_rate(), want[t]) << "step " << t;
  }
  EXPECT_EQ(State("r-upd").at("optimizer.lr_scheduler.last_epoch"), std::vector<float>{5.0f});

  // The same schedule with a new base lr (what set_lr / normctl lr send): progress kept.
  o.mutable_sgd()->set_lr(0.2f);
  ASSERT_TRUE(Update("r-upd", o, &m).ok());
  EXPECT_DOUBLE_EQ(m.learning_rate(), static_cast<double>(0.2f) * 0.25);
  EXPECT_EQ(State("r-upd").at("optimizer.lr_scheduler.last_epoch"), std::vector<float>{5.0f});

  // SetState can move the progress (e.g. to resume a changed schedule part-way).
  v1::SetStateRequest set;
  set.set_model("r-upd");
  auto* e = set.mutable_state()->add_tensors();
  e->set_name("optimizer.lr_scheduler.last_epoch");
  *e->mutable_tensor() = MakeTensor({}, {0.0f});
  ASSERT_TRUE(stub_->SetState(Ctx().get(), set, &m).ok());
  EXPECT_DOUBLE_EQ(m.learning_rate(), static_cast<double>(0.2f));

  // Removing the schedule: the lr throughout, and no progress entry.
  o.clear_lr_schedule();
  ASSERT_TRUE(Update("r-upd", o, &m).ok());
  EXPECT_DOUBLE_EQ(Train("r-upd", 500).learning_rate(), static_cast<double>(0.2f));
  EXPECT_EQ(State("r-upd").count("optimizer.lr_scheduler.last_epoch"), 0u);
}

// The parameters' total movement in one step, running statistics and optimizer state aside.
double Movement(const std::map<std::string, std::vector<float>>& before,
                const std::map<std::string, std::vector<float>>& after) {
  double sq = 0.0;
  for (const auto& [name, v] : before) {
    if (name.rfind("optimizer.", 0) == 0 || name.find("running") != std::string::npos ||
        name.find("num_batches") != std::string::npos) {
      continue;
    }
    for (size_t i = 0; i < v.size(); ++i) {
      const double d = double{after.at(name)[i]} - v[i];
      sq += d * d;
    }
  }
  return std::sqrt(sq);
}

TEST_F(RecipeTest, ClippingSetByUpdateOptimizerBoundsTheNextStep) {
  v1::ModelSpec spec = MlpSpec(kIn, 64, kOut, 6, 0.1f);
  spec.mutable_optimizer()->mutable_sgd()->set_momentum(0.0f);  // a step is lr * gradient
  ASSERT_TRUE(Create("r-clip", spec).ok());
  auto before = State("r-clip");
  v1::TrainStepResponse r = Train("r-clip", 900);
  EXPECT_NEAR(Movement(before, State("r-clip")), 0.1 * r.grad_norm(), 1e-4 * r.grad_norm());

  v1::OptimizerSpec o = spec.optimizer();
  o.mutable_clip_grad_norm()->set_max_norm(0.01);
  ASSERT_TRUE(Update("r-clip", o).ok());
  before = State("r-clip");
  r = Train("r-clip", 901);
  ASSERT_GT(r.grad_norm(), 0.1);  // reported before clipping
  EXPECT_NEAR(Movement(before, State("r-clip")), 0.1 * 0.01, 1e-6);
}

TEST_F(RecipeTest, ApplyGradientsAndTrainStreamReportTheSameFiguresAsTrainStep) {
  ASSERT_TRUE(Create("r-twin-a", RecipeSpec()).ok());
  ASSERT_TRUE(Create("r-twin-b", RecipeSpec()).ok());
  ASSERT_TRUE(Create("r-twin-c", RecipeSpec()).ok());
  std::vector<v1::TrainStepResponse> streamed;
  {
    grpc::ClientContext ctx;
    auto stream = stub_->TrainStream(&ctx);
    for (int t = 0; t < 5; ++t) {
      v1::TrainStepRequest req;
      req.set_model("r-twin-c");
      *req.mutable_input() = Batch(16, 600 + t);
      for (int64_t l : RandomLabels(16, kOut, 600 + t)) req.add_labels(l);
      ASSERT_TRUE(stream->Write(req));
      v1::TrainStepResponse r;
      ASSERT_TRUE(stream->Read(&r));
      streamed.push_back(r);
    }
    stream->WritesDone();
    ASSERT_TRUE(stream->Finish().ok());
  }
  for (int t = 0; t < 5; ++t) {
    const v1::TrainStepResponse a = Train("r-twin-a", 600 + t);
    // The same step by Forward(retain) + Backward(dL/dy) + ApplyGradients.
    v1::ForwardRequest f;
    f.set_model("r-twin-b");
    *f.mutable_input() = Batch(16, 600 + t);
    f.set_retain_for_backward(true);
    v1::ForwardResponse fr;
    ASSERT_TRUE(stub_->Forward(Ctx().get(), f, &fr).ok());
    const std::vector<float> out = Values(fr.output());
    const std::vector<int64_t> labels = RandomLabels(16, kOut, 600 + t);
    Targets targets;
    targets.labels = labels.data();
    targets.num_labels = 16;
    Tensor grad;
    ComputeLoss(LossKind::kCrossEntropy, ConstTensorView{out.data(), Shape{16, kOut}}, targets,
                &grad, 0.1);
    v1::BackwardRequest b;
    b.set_model("r-twin-b");
    b.set_forward_id(fr.forward_id());
    *b.mutable_grad_output() =
        MakeTensor({16, kOut}, std::vector<float>(grad.data(), grad.data() + grad.size()), true);
    v1::BackwardResponse br;
    ASSERT_TRUE(stub_->Backward(Ctx().get(), b, &br).ok());
    v1::ApplyGradientsRequest ar;
    ar.set_model("r-twin-b");
    v1::ApplyGradientsResponse resp;
    ASSERT_TRUE(stub_->ApplyGradients(Ctx().get(), ar, &resp).ok());
    EXPECT_EQ(resp.step(), a.step());
    EXPECT_EQ(resp.grad_norm(), a.grad_norm()) << "step " << t;
    EXPECT_EQ(resp.learning_rate(), a.learning_rate()) << "step " << t;
    EXPECT_EQ(streamed[t].grad_norm(), a.grad_norm()) << "step " << t;
    EXPECT_EQ(streamed[t].learning_rate(), a.learning_rate()) << "step " << t;
  }
  EXPECT_TRUE(SameState(State("r-twin-a"), State("r-twin-b")));
  EXPECT_TRUE(SameState(State("r-twin-a"), State("r-twin-c")));
}

TEST_F(RecipeTest, MetricsShowGradNormAndLearningRatePerModel) {
  ASSERT_TRUE(Create("r-met", RecipeSpec()).ok());
  // Like every per-model series, the two gauges carry the tenant (default without tenants).
  const std::vector<std::string> label = {"tenant=\"default\"", "model=\"r-met\""};
  std::string text = HttpGet(server_->metrics_port(), "/metrics");
  EXPECT_NEAR(MetricValue(text, "normd_learning_rate", label), RecipeLr(0.05f, 0), 1e-15);
  EXPECT_EQ(MetricValue(text, "normd_grad_norm", label), 0.0);  // no step yet
  v1::TrainStepResponse r;
  for (int t = 0; t < 4; ++t) r = Train("r-met", 700 + t);
  text = HttpGet(server_->metrics_port(), "/metrics");
  // The exposition prints doubles with enough digits to compare closely.
  EXPECT_NEAR(MetricValue(text, "normd_grad_norm", label), r.grad_norm(), 1e-12 * r.grad_norm());
  EXPECT_NEAR(MetricValue(text, "normd_learning_rate", label), Get("r-met").learning_rate(),
              1e-15);
  // UpdateOptimizer moves the gauge at once.
  v1::OptimizerSpec o = RecipeSpec().optimizer();
  o.clear_lr_schedule();
  o.mutable_sgd()->set_lr(0.125f);
  ASSERT_TRUE(Update("r-met", o).ok());
  text = HttpGet(server_->metrics_port(), "/metrics");
  EXPECT_EQ(MetricValue(text, "normd_learning_rate", label), 0.125);
  // A deleted model's series go with it.
  v1::DeleteModelRequest del;
  del.set_model("r-met");
  v1::DeleteModelResponse dr;
  ASSERT_TRUE(stub_->DeleteModel(Ctx().get(), del, &dr).ok());
  text = HttpGet(server_->metrics_port(), "/metrics");
  EXPECT_TRUE(std::isnan(MetricValue(text, "normd_learning_rate", label)));
  EXPECT_TRUE(std::isnan(MetricValue(text, "normd_grad_norm", label)));
}

// The schedule's progress is checkpointed with the optimizer state: after a restart the next
// step uses the rate the schedule had reached, and training continues bit-identically.
TEST(RecipeRestartTest, ScheduleProgressSurvivesARestart) {
  std::string tmpl = (std::filesystem::temp_directory_path() / "normd-recipe-XXXXXX").string();
  ASSERT_NE(mkdtemp(tmpl.data()), nullptr);
  const std::string data = "--data-dir=" + tmpl;
  auto train = [](v1::Trainer::Stub* stub, const std::string& id, uint64_t seed) {
    v1::TrainStepRequest req;
    req.set_model(id);
    *req.mutable_input() = MakeTensor({16, kIn}, RandomValues(16 * kIn, seed), true);
    for (int64_t l : RandomLabels(16, kOut, seed)) req.add_labels(l);
    v1::TrainStepResponse resp;
    EXPECT_TRUE(stub->TrainStep(Ctx().get(), req, &resp).ok());
    return resp;
  };
  auto state = [](v1::Trainer::Stub* stub, const std::string& id) {
    v1::GetStateRequest req;
    req.set_model(id);
    req.set_include_optimizer(true);
    v1::ModelState st;
    EXPECT_TRUE(stub->GetState(Ctx().get(), req, &st).ok());
    return StateMap(st);
  };
  std::string error;
  std::vector<v1::TrainStepResponse> uninterrupted;
  {
    // A reference run without a restart, on another id.
    auto server = NormdProcess::Start({data}, &error);
    ASSERT_NE(server, nullptr) << error;
    auto stub = server->NewStub();
    for (const char* id : {"keep", "ref"}) {
      v1::CreateModelRequest req;
      req.set_id(id);
      *req.mutable_spec() = RecipeSpec();
      v1::Model m;
      ASSERT_TRUE(stub->CreateModel(Ctx().get(), req, &m).ok());
    }
    for (int t = 0; t < 12; ++t) uninterrupted.push_back(train(stub.get(), "ref", 800 + t));
    for (int t = 0; t < 7; ++t) train(stub.get(), "keep", 800 + t);
    EXPECT_EQ(server->Stop(SIGTERM, std::chrono::seconds(20)), 0);  // saves what changed
  }
  {
    auto server = NormdProcess::Start({data}, &error);
    ASSERT_NE(server, nullptr) << error;
    auto stub = server->NewStub();
    v1::GetModelRequest gm;
    gm.set_model("keep");
    v1::Model m;
    ASSERT_TRUE(stub->GetModel(Ctx().get(), gm, &m).ok());
    EXPECT_EQ(m.step(), 7u);
    EXPECT_EQ(m.learning_rate(), uninterrupted[7].learning_rate());
    EXPECT_EQ(state(stub.get(), "keep").at("optimizer.lr_scheduler.last_epoch"),
              std::vector<float>{7.0f});
    for (int t = 7; t < 12; ++t) {
      const v1::TrainStepResponse r = train(stub.get(), "keep", 800 + t);
      EXPECT_EQ(r.learning_rate(), uninterrupted[t].learning_rate()) << "step " << t;
      EXPECT_EQ(r.grad_norm(), uninterrupted[t].grad_norm()) << "step " << t;
    }
    EXPECT_TRUE(SameState(state(stub.get(), "keep"), state(stub.get(), "ref")));
  }
  std::error_code ec;
  std::filesystem::remove_all(tmpl, ec);
}

}  // namespace
}  // namespace normd::testing
