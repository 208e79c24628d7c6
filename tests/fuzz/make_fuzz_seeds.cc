// Writes the generated part of the fuzz targets' seed corpora (tests/fuzz/README.md); the
// hand-written edge cases beside them (corpus/spec/*.txt, regression-*) are committed as they are.
//   make_fuzz_seeds <corpus dir>      (tests/fuzz/corpus)
// Output is deterministic (but for the checkpoints' creation time), so rerunning it after a
// format change shows a meaningful diff.
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "core/model.h"
#include "normd/v1/normd.pb.h"
#include "server/checkpoint.h"
#include "server/convert.h"
#include "tests/fuzz/fuzz_util.h"
#include "tests/fuzz/sequence_fuzz.h"

namespace normd::fuzz {
namespace {

bool ok = true;

void WriteFile(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << bytes;
  if (!out) {
    std::fprintf(stderr, "cannot write %s\n", path.c_str());
    ok = false;
  }
}

// --- Specs -------------------------------------------------------------------------------------

v1::LayerSpec* Linear(v1::ModelSpec* s, int64_t in, int64_t out) {
  v1::LayerSpec* l = s->add_layers();
  l->mutable_linear()->set_in_features(in);
  l->mutable_linear()->set_out_features(out);
  return l;
}

v1::ModelSpec Mlp() {
  v1::ModelSpec s;
  s.add_input_shape(8);
  Linear(&s, 8, 16);
  v1::LayerSpec* bn = s.add_layers();
  bn->set_name("bn1");
  bn->mutable_batch_norm1d()->set_num_features(16);
  s.add_layers()->mutable_relu();
  Linear(&s, 16, 4);
  s.set_loss(v1::LOSS_CROSS_ENTROPY);
  s.mutable_optimizer()->mutable_sgd()->set_lr(0.05f);
  s.mutable_optimizer()->mutable_sgd()->set_momentum(0.9f);
  s.set_seed(1);
  return s;
}

v1::ModelSpec Conv() {
  v1::ModelSpec s;
  for (int64_t d : {1, 6, 6}) s.add_input_shape(d);
  v1::Conv2dSpec* c = s.add_layers()->mutable_conv2d();
  c->set_in_channels(1);
  c->set_out_channels(4);
  c->set_kernel_size(3);
  c->set_padding(1);
  s.add_layers()->mutable_batch_norm2d()->set_num_features(4);
  s.add_layers()->mutable_relu();
  s.add_layers()->mutable_max_pool2d()->set_kernel_size(2);
  s.add_layers()->mutable_flatten();
  Linear(&s, 36, 3);
  s.set_loss(v1::LOSS_CROSS_ENTROPY);
  s.mutable_optimizer()->mutable_adam()->set_lr(1e-3f);
  s.set_seed(2);
  return s;
}

v1::ModelSpec PoolNorm() {
  v1::ModelSpec s;
  for (int64_t d : {2, 4, 4}) s.add_input_shape(d);
  v1::Pool2dSpec* p = s.add_layers()->mutable_avg_pool2d();
  p->set_kernel_size(2);
  p->set_stride(1);
  p->set_padding(1);
  v1::LayerNormSpec* ln = s.add_layers()->mutable_layer_norm();
  for (int64_t d : {2, 5, 5}) ln->add_normalized_shape(d);
  ln->set_eps(1e-3f);
  s.add_layers()->mutable_flatten();
  Linear(&s, 50, 2)->mutable_linear()->set_bias(false);
  s.set_loss(v1::LOSS_BCE_WITH_LOGITS);
  v1::AdamSpec* a = s.mutable_optimizer()->mutable_adam();
  a->set_lr(0.01f);
  a->set_beta1(0.8f);
  a->set_weight_decay(0.01f);
  a->set_decoupled_weight_decay(true);
  s.set_seed(3);
  return s;
}

v1::ModelSpec Activations() {
  v1::ModelSpec s;
  s.add_input_shape(6);
  Linear(&s, 6, 6);
  s.add_layers()->mutable_leaky_relu()->set_negative_slope(0.2f);
  s.add_layers()->mutable_dropout()->set_p(0.3f);
  Linear(&s, 6, 6);
  s.add_layers()->mutable_tanh();
  Linear(&s, 6, 6);
  s.add_layers()->mutable_gelu();
  s.add_layers()->mutable_sigmoid();
  Linear(&s, 6, 2);
  s.set_loss(v1::LOSS_MSE);
  v1::SGDSpec* g = s.mutable_optimizer()->mutable_sgd();
  g->set_lr(0.1f);
  g->set_momentum(0.5f);
  g->set_nesterov(true);
  g->set_weight_decay(1e-4f);
  s.set_seed(4);
  return s;
}

v1::ModelSpec BatchNormOptions() {
  v1::ModelSpec s;
  s.add_input_shape(5);
  Linear(&s, 5, 5);
  v1::BatchNormSpec* a = s.add_layers()->mutable_batch_norm1d();
  a->set_num_features(5);
  a->set_affine(false);
  a->set_momentum(0.3f);
  a->set_eps(1e-3f);
  v1::BatchNormSpec* b = s.add_layers()->mutable_batch_norm1d();
  b->set_num_features(5);
  b->set_track_running_stats(false);
  v1::BatchNormSpec* c = s.add_layers()->mutable_batch_norm1d();
  c->set_num_features(5);
  c->set_cumulative_average(true);
  Linear(&s, 5, 3);
  s.set_loss(v1::LOSS_CROSS_ENTROPY);
  s.mutable_optimizer()->mutable_sgd()->set_lr(0.01f);
  s.set_seed(5);
  return s;
}

v1::ModelSpec TooLarge() {
  v1::ModelSpec s = Mlp();
  s.mutable_layers(0)->mutable_linear()->set_out_features(1 << 20);
  return s;
}

void WriteSpecs(const std::string& dir) {
  const std::pair<const char*, v1::ModelSpec> specs[] = {
      {"mlp", Mlp()},
      {"conv-bn2d-maxpool", Conv()},
      {"avgpool-layernorm-bce", PoolNorm()},
      {"activations-dropout-mse", Activations()},
      {"batchnorm-options", BatchNormOptions()},
      {"too-large", TooLarge()},
  };
  for (const auto& [name, spec] : specs)
    WriteFile(dir + "/" + name + ".bin", spec.SerializeAsString());
}

// --- Tensors -----------------------------------------------------------------------------------

v1::Tensor WireTensor(const std::vector<int64_t>& shape, const std::vector<float>& values,
                      bool raw) {
  v1::Tensor t;
  for (int64_t d : shape) t.add_shape(d);
  if (raw) {
    t.set_raw(std::string(reinterpret_cast<const char*>(values.data()), values.size() * 4));
  } else {
    for (float v : values) t.add_values(v);
  }
  return t;
}

void WriteMessage(const std::string& path, uint8_t selector, const google::protobuf::Message& m) {
  WriteFile(path, std::string(1, static_cast<char>(selector)) + m.SerializeAsString());
}

void WriteTensors(const std::string& dir) {
  const std::vector<float> six = {1, -2, 3.5f, 0, -0.25f, 1e-7f};
  struct Case {
    const char* name;
    v1::Tensor t;
  };
  std::vector<Case> cases = {
      {"values-2x3", WireTensor({2, 3}, six, false)},
      {"raw-2x3", WireTensor({2, 3}, six, true)},
      {"scalar", WireTensor({}, {42}, false)},
      {"empty-0x4", WireTensor({0, 4}, {}, false)},
      {"rank6", WireTensor({1, 1, 2, 1, 3, 1}, six, true)},
      {"rank7", WireTensor({1, 1, 1, 1, 1, 1, 6}, six, false)},
      {"negative-dim", WireTensor({-2, -3}, six, false)},
      {"count-mismatch", WireTensor({2, 4}, six, false)},
      {"over-limit", WireTensor({1 << 20, 1 << 20}, six, false)},
      {"overflowing-product", WireTensor({int64_t{1} << 40, int64_t{1} << 40, 1 << 20}, {}, false)},
      {"nan-inf", WireTensor({3},
                             {std::numeric_limits<float>::quiet_NaN(),
                              std::numeric_limits<float>::infinity(), -0.0f},
                             true)},
  };
  v1::Tensor both = WireTensor({2, 3}, six, false);
  both.set_raw(std::string(24, '\1'));
  cases.push_back({"both-encodings", both});
  v1::Tensor odd = WireTensor({1}, {}, false);
  odd.set_raw("abcde");
  cases.push_back({"raw-5-bytes", odd});
  for (const Case& c : cases) WriteMessage(dir + "/tensor-" + c.name, 0, c.t);

  v1::TrainStepRequest step;
  step.set_model("m");
  *step.mutable_input() = WireTensor({2, 3}, six, false);
  step.add_labels(0);
  step.add_labels(2);
  WriteMessage(dir + "/trainstep-labels", 1, step);
  step.clear_labels();
  *step.mutable_target() = WireTensor({2, 3}, six, true);
  WriteMessage(dir + "/trainstep-target", 1, step);
  step.add_labels(1);
  WriteMessage(dir + "/trainstep-both", 1, step);

  v1::ModelState state;
  v1::NamedTensor* w = state.add_tensors();
  w->set_name("0.weight");
  *w->mutable_tensor() = WireTensor({2, 3}, six, false);
  v1::NamedTensor* n = state.add_tensors();
  n->set_name("1.num_batches_tracked");
  *n->mutable_tensor() = WireTensor({}, {7}, false);
  WriteMessage(dir + "/state-two-entries", 2, state);
  state.add_tensors()->set_name("");
  WriteMessage(dir + "/state-empty-name", 2, state);
}

// --- Sequences ---------------------------------------------------------------------------------

// A program for sequence_fuzz (format: sequence_fuzz.h).
class Program {
 public:
  explicit Program(uint8_t config) { bytes_.push_back(static_cast<char>(config)); }
  Program& Op(SequenceOp op, int slot = 0) { return Put(OpByte(op, slot)); }
  Program& Put(uint8_t b) {
    bytes_.push_back(static_cast<char>(b));
    return *this;
  }
  // A batch of `rows` rows in value mode `mode` with varied values.
  Program& Batch(int rows, int mode = 0, bool five = false) {
    Put(BatchByte(rows, mode, five));
    for (int i = 0; i < rows * (five ? 5 : kSequenceFeatures); ++i)
      Put(static_cast<uint8_t>(i * 37 + 11));
    return *this;
  }
  Program& Forward(int slot, int rows, bool retain, int mode = 0, uint8_t extra = 0) {
    return Op(kForward, slot).Batch(rows, mode).Put((retain ? 1 : 0) | extra);
  }
  Program& Backward(int slot, uint8_t which, uint8_t grad = 0) {
    return Op(kBackward, slot).Put(which).Put(grad);
  }
  Program& Train(int slot, int rows, uint8_t targets = 0, int mode = 0) {
    return Op(kTrainStep, slot).Batch(rows, mode).Put(targets);
  }
  Program& Evaluate(int slot, int rows, uint8_t targets = 0) {
    return Op(kEvaluate, slot).Batch(rows).Put(targets);
  }
  const std::string& bytes() const { return bytes_; }

 private:
  std::string bytes_;
};

void WriteSequences(const std::string& dir) {
  auto write = [&](const char* name, const Program& p) { WriteFile(dir + "/" + name, p.bytes()); };

  for (uint8_t config = 0; config < 8; ++config) {
    Program p(config);
    p.Op(kCreate)
        .Forward(0, 4, true)
        .Backward(0, 1, 4)
        .Op(kApplyGradients)
        .Train(0, 5)
        .Evaluate(0, 3)
        .Op(kGetState)
        .Put(1)
        .Op(kSetState)
        .Put(8)
        .Op(kResetRunningStats)
        .Op(kUpdateOptimizer)
        .Put(1 << 2)
        .Train(0, 2)
        .Op(kSetMode)
        .Put(0)
        .Forward(0, 1, true)
        .Backward(0, 1)
        .Op(kApplyGradients)
        .Op(kDelete);
    write(("lifecycle-config" + std::to_string(config)).c_str(), p);
  }

  write("stale-after-step",
        Program(0).Op(kCreate).Forward(0, 3, true).Train(0, 3).Backward(0, 1).Backward(0, 1));
  write("stale-after-mode-switch",
        Program(0).Op(kCreate).Forward(0, 3, true).Op(kSetMode).Put(0).Backward(0, 1));
  write("backward-twice-and-unknown-ids", Program(1)
                                              .Op(kCreate)
                                              .Forward(0, 2, true)
                                              .Backward(0, 1)
                                              .Backward(0, 1)
                                              .Backward(0, 0)
                                              .Backward(0, 3)
                                              .Backward(0, 200)
                                              .Op(kApplyGradients)
                                              .Op(kApplyGradients));
  write("bad-grad-then-retry", Program(0)
                                   .Op(kCreate)
                                   .Forward(0, 2, true)
                                   .Backward(0, 1, 1)
                                   .Backward(0, 1, 2)
                                   .Backward(0, 1, 4)
                                   .Op(kApplyGradients));
  write("retained-limit", Program(0)
                              .Op(kCreate)
                              .Forward(0, 2, true)
                              .Forward(0, 2, true)
                              .Forward(0, 2, true)
                              .Forward(0, 2, true)
                              .Backward(0, 2)
                              .Forward(0, 2, true)
                              .Op(kResetRunningStats)
                              .Backward(0, 1));
  write("frozen-and-eval", Program(2)
                               .Op(kCreate)
                               .Op(kSetMode)
                               .Put(1 | 2 | 4)
                               .Forward(0, 3, false)
                               .Train(0, 3)
                               .Op(kSetMode)
                               .Put(1)
                               .Forward(0, 3, false)
                               .Op(kSetMode)
                               .Put(0)
                               .Forward(0, 1, false, 0, 2 | 4)
                               .Evaluate(0, 1)
                               .Train(0, 1));
  write("bad-inputs", Program(0)
                          .Op(kCreate)
                          .Forward(0, 0, false)
                          .Forward(0, 1, false)
                          .Op(kForward)
                          .Batch(2, 0, true)
                          .Put(0)
                          .Forward(0, 2, false, 5)
                          .Forward(0, 2, false, 6)
                          .Train(0, 3, 1)
                          .Train(0, 3, 2)
                          .Train(0, 3, 4)
                          .Evaluate(0, 2, 1));
  write("bad-inputs-mse", Program(kSequenceMse)
                              .Op(kCreate)
                              .Train(0, 3, 1)
                              .Train(0, 3, 2)
                              .Train(0, 3, 4)
                              .Evaluate(0, 2, 1)
                              .Train(0, 3));
  write("huge-values", Program(0)
                           .Op(kCreate)
                           .Train(0, 4, 0, 7)
                           .Forward(0, 3, true, 7)
                           .Backward(0, 1)
                           .Op(kApplyGradients)
                           .Train(0, 4));
  {
    Program p(0);
    p.Op(kCreate).Train(0, 4).Op(kGetState).Put(1);
    for (uint8_t change = 0; change < 8; ++change) {
      p.Op(kSetState).Put(change).Op(kSetState).Put(change | 8);
    }
    write("setstate-changes", p);
  }
  write("two-models", Program(kSequenceAdam)
                          .Op(kCreate, 0)
                          .Op(kCreate, 1)
                          .Op(kCreate, 0)
                          .Train(0, 4)
                          .Op(kGetState, 0)
                          .Put(1)
                          .Op(kSetState, 1)
                          .Put(16 | 8)
                          .Forward(1, 2, true)
                          .Op(kDelete, 0)
                          .Train(0, 2)
                          .Op(kDelete, 0)
                          .Op(kCreate, 0)
                          .Backward(1, 1));
  {
    Program p(0);
    p.Op(kCreate);
    for (uint8_t u = 0; u < 64; u += 5) p.Op(kUpdateOptimizer).Put(u).Train(0, 2);
    write("update-optimizer", p);
  }
  write("unknown-model", Program(0)
                             .Forward(1, 2, true)
                             .Backward(1, 1)
                             .Op(kApplyGradients, 1)
                             .Train(1, 2)
                             .Evaluate(1, 2)
                             .Op(kGetState, 1)
                             .Put(0)
                             .Op(kSetMode, 1)
                             .Put(1)
                             .Op(kResetRunningStats, 1)
                             .Op(kUpdateOptimizer, 1)
                             .Put(4)
                             .Op(kDelete, 1));
}

// --- Checkpoints -------------------------------------------------------------------------------

void WriteCheckpoint(const std::string& dir, const std::string& name, const v1::ModelSpec& spec,
                     int steps, bool training, bool frozen) {
  ModelConfig config;
  Status s = server::SpecToConfig(spec, &config);
  std::unique_ptr<Model> model;
  if (s.ok()) s = Model::Create(config, Sequential::Limits(), &model);
  if (!s.ok()) {
    std::fprintf(stderr, "%s: %s\n", name.c_str(), s.message().c_str());
    ok = false;
    return;
  }
  const int64_t batch = 4;
  const Shape x_shape = model->net().input_shape().WithBatch(batch);
  const std::vector<float> x = PseudoRandom(x_shape.NumElements(), 7);
  const Shape y_shape = model->net().output_shape().WithBatch(batch);
  std::vector<float> target = PseudoRandom(y_shape.NumElements(), 8);
  for (float& v : target) v = v < 0 ? 0.0f : 1.0f;
  std::vector<int64_t> labels = {0, 1, 2, 1};
  Targets t;
  if (config.loss == LossKind::kCrossEntropy) {
    t.labels = labels.data();
    t.num_labels = batch;
  } else {
    t.target = ConstTensorView{target.data(), y_shape};
  }
  ForwardRecord rec;
  for (int i = 0; i < steps; ++i) {
    TrainResult r;
    s = model->TrainStep(ConstTensorView{x.data(), x_shape}, t, &rec, &r);
    if (!s.ok()) {
      std::fprintf(stderr, "%s: %s\n", name.c_str(), s.message().c_str());
      ok = false;
      return;
    }
  }
  model->SetMode(training, frozen);
  server::CheckpointSnapshot snap;
  s = server::SnapshotCheckpoint(name, spec, *model, &snap);
  if (!s.ok()) {
    ok = false;
    return;
  }
  WriteFile(dir + "/" + name + ".nckpt", snap.bytes);
}

void WriteCheckpoints(const std::string& dir) {
  WriteCheckpoint(dir, "mlp-sgd-train", Mlp(), 2, true, false);
  v1::ModelSpec adam = Mlp();
  adam.mutable_optimizer()->mutable_adam()->set_lr(1e-3f);
  WriteCheckpoint(dir, "mlp-adam-eval", adam, 3, false, false);
  WriteCheckpoint(dir, "conv-frozen", Conv(), 1, true, true);
  WriteCheckpoint(dir, "avgpool-layernorm-new", PoolNorm(), 0, true, false);
  WriteCheckpoint(dir, "batchnorm-options", BatchNormOptions(), 2, false, false);
}

}  // namespace
}  // namespace normd::fuzz

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s <corpus dir>\n", argv[0]);
    return 2;
  }
  const std::string root = argv[1];
  for (const char* sub : {"spec", "tensor", "sequence", "checkpoint"}) {
    std::filesystem::create_directories(root + "/" + sub);
  }
  normd::fuzz::WriteSpecs(root + "/spec");
  normd::fuzz::WriteTensors(root + "/tensor");
  normd::fuzz::WriteSequences(root + "/sequence");
  normd::fuzz::WriteCheckpoints(root + "/checkpoint");
  return normd::fuzz::ok ? 0 : 1;
}
