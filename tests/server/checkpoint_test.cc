// Tests of server/checkpoint.{h,cc}: bit-exact round trips, rotation, crash leftovers, and
// corruption (every bit flip, every truncation) never loading as a model.
#include "server/checkpoint.h"

#include <gtest/gtest.h>
#include <google/protobuf/util/message_differencer.h>
#include <spdlog/spdlog.h>
#include <stdlib.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include "core/model.h"
#include "core/rng.h"

namespace normd::server {
namespace {

namespace fs = std::filesystem;

// --- Two small models, built both as core configs and as the matching wire specs. ---------

// 6 -> Linear(12) -> BatchNorm1d -> ReLU -> Dropout(0.25) -> Linear(3), cross-entropy, Adam.
ModelConfig MlpConfig(uint64_t seed) {
  ModelConfig c;
  c.input_shape = {6};
  LayerConfig l;
  l.kind = LayerKind::kLinear;
  l.linear = {6, 12, true};
  c.layers.push_back(l);
  l = LayerConfig();
  l.kind = LayerKind::kBatchNorm1d;
  l.batch_norm.num_features = 12;
  c.layers.push_back(l);
  l = LayerConfig();
  l.kind = LayerKind::kReLU;
  c.layers.push_back(l);
  l = LayerConfig();
  l.kind = LayerKind::kDropout;
  l.dropout_p = 0.25f;
  c.layers.push_back(l);
  l = LayerConfig();
  l.kind = LayerKind::kLinear;
  l.linear = {12, 3, true};
  c.layers.push_back(l);
  c.loss = LossKind::kCrossEntropy;
  c.optimizer.kind = OptimizerKind::kAdam;
  c.optimizer.adam.lr = 0.01f;
  c.optimizer.adam.weight_decay = 0.01f;
  c.optimizer.adam.decoupled_weight_decay = true;
  c.seed = seed;
  return c;
}

v1::ModelSpec MlpSpec(uint64_t seed) {
  v1::ModelSpec s;
  s.add_input_shape(6);
  v1::LinearSpec* lin = s.add_layers()->mutable_linear();
  lin->set_in_features(6);
  lin->set_out_features(12);
  s.add_layers()->mutable_batch_norm1d()->set_num_features(12);
  s.add_layers()->mutable_relu();
  s.add_layers()->mutable_dropout()->set_p(0.25f);
  lin = s.add_layers()->mutable_linear();
  lin->set_in_features(12);
  lin->set_out_features(3);
  s.set_loss(v1::LOSS_CROSS_ENTROPY);
  v1::AdamSpec* adam = s.mutable_optimizer()->mutable_adam();
  adam->set_lr(0.01f);
  adam->set_weight_decay(0.01f);
  adam->set_decoupled_weight_decay(true);
  s.set_seed(seed);
  return s;
}

// (2, 6, 6) -> Conv2d(4, k3, p1) -> BatchNorm2d -> ReLU -> MaxPool2d(2) -> Flatten ->
// Linear(36 -> 5) -> BatchNorm1d(cumulative average) -> Linear(2), MSE, SGD with Nesterov.
ModelConfig ConvConfig(uint64_t seed) {
  ModelConfig c;
  c.input_shape = {2, 6, 6};
  LayerConfig l;
  l.kind = LayerKind::kConv2d;
  l.conv2d.in_channels = 2;
  l.conv2d.out_channels = 4;
  l.conv2d.kernel_size = 3;
  l.conv2d.padding = 1;
  c.layers.push_back(l);
  l = LayerConfig();
  l.kind = LayerKind::kBatchNorm2d;
  l.batch_norm.num_features = 4;
  c.layers.push_back(l);
  l = LayerConfig();
  l.kind = LayerKind::kReLU;
  c.layers.push_back(l);
  l = LayerConfig();
  l.kind = LayerKind::kMaxPool2d;
  l.pool.kernel_size = 2;
  c.layers.push_back(l);
  l = LayerConfig();
  l.kind = LayerKind::kFlatten;
  c.layers.push_back(l);
  l = LayerConfig();
  l.kind = LayerKind::kLinear;
  l.linear = {36, 5, true};
  c.layers.push_back(l);
  l = LayerConfig();
  l.kind = LayerKind::kBatchNorm1d;
  l.batch_norm.num_features = 5;
  l.batch_norm.cumulative_average = true;
  c.layers.push_back(l);
  l = LayerConfig();
  l.kind = LayerKind::kLinear;
  l.linear = {5, 2, true};
  c.layers.push_back(l);
  c.loss = LossKind::kMse;
  c.optimizer.kind = OptimizerKind::kSgd;
  c.optimizer.sgd.lr = 0.05f;
  c.optimizer.sgd.momentum = 0.9f;
  c.optimizer.sgd.nesterov = true;
  c.optimizer.sgd.weight_decay = 1e-3f;
  c.seed = seed;
  return c;
}

v1::ModelSpec ConvSpec(uint64_t seed) {
  v1::ModelSpec s;
  s.add_input_shape(2);
  s.add_input_shape(6);
  s.add_input_shape(6);
  v1::Conv2dSpec* conv = s.add_layers()->mutable_conv2d();
  conv->set_in_channels(2);
  conv->set_out_channels(4);
  conv->set_kernel_size(3);
  conv->set_padding(1);
  s.add_layers()->mutable_batch_norm2d()->set_num_features(4);
  s.add_layers()->mutable_relu();
  s.add_layers()->mutable_max_pool2d()->set_kernel_size(2);
  s.add_layers()->mutable_flatten();
  v1::LinearSpec* lin = s.add_layers()->mutable_linear();
  lin->set_in_features(36);
  lin->set_out_features(5);
  v1::BatchNormSpec* bn = s.add_layers()->mutable_batch_norm1d();
  bn->set_num_features(5);
  bn->set_cumulative_average(true);
  lin = s.add_layers()->mutable_linear();
  lin->set_in_features(5);
  lin->set_out_features(2);
  s.set_loss(v1::LOSS_MSE);
  v1::SGDSpec* sgd = s.mutable_optimizer()->mutable_sgd();
  sgd->set_lr(0.05f);
  sgd->set_momentum(0.9f);
  sgd->set_nesterov(true);
  sgd->set_weight_decay(1e-3f);
  s.set_seed(seed);
  return s;
}

std::unique_ptr<Model> Build(const ModelConfig& config) {
  std::unique_ptr<Model> m;
  const Status st = Model::Create(config, Sequential::Limits(), &m);
  EXPECT_TRUE(st.ok()) << st.message();
  return m;
}

// A deterministic batch for `model`: inputs, and labels or targets to suit its loss.
struct Batch {
  Tensor x;
  std::vector<int64_t> labels;
  Tensor target;

  Targets targets() const {
    Targets t;
    if (!labels.empty()) {
      t.labels = labels.data();
      t.num_labels = static_cast<int64_t>(labels.size());
    } else {
      t.target = target.view();
    }
    return t;
  }
};

Batch MakeBatch(const Model& model, int64_t n, uint64_t seed) {
  Rng rng(seed);
  Batch b;
  Shape in;
  Shape::FromVector(model.config().input_shape, &in);
  b.x = Tensor(in.WithBatch(n));
  for (int64_t i = 0; i < b.x.size(); ++i) b.x.data()[i] = rng.Uniform(-2.0f, 2.0f);
  const Shape out = model.net().output_shape();
  if (model.config().loss == LossKind::kCrossEntropy) {
    for (int64_t i = 0; i < n; ++i) b.labels.push_back(static_cast<int64_t>(rng.Next() % out[0]));
  } else {
    b.target = Tensor(out.WithBatch(n));
    for (int64_t i = 0; i < b.target.size(); ++i) b.target.data()[i] = rng.Uniform(-1.0f, 1.0f);
  }
  return b;
}

TrainResult Train(Model* model, int steps, uint64_t seed) {
  ForwardRecord rec;
  TrainResult r;
  for (int s = 0; s < steps; ++s) {
    const Batch b = MakeBatch(*model, 8, seed + s);
    const Status st = model->TrainStep(b.x.view(), b.targets(), &rec, &r);
    EXPECT_TRUE(st.ok()) << st.message();
  }
  return r;
}

uint32_t Bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// Every state entry (optimizer included) identical bit for bit.
void ExpectSameState(const std::vector<NamedTensor>& a, const std::vector<NamedTensor>& b) {
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(a[i].name, b[i].name);
    EXPECT_EQ(a[i].shape, b[i].shape) << a[i].name;
    ASSERT_EQ(a[i].values.size(), b[i].values.size()) << a[i].name;
    for (size_t j = 0; j < a[i].values.size(); ++j) {
      ASSERT_EQ(Bits(a[i].values[j]), Bits(b[i].values[j])) << a[i].name << "[" << j << "]";
    }
  }
}

void ExpectSameModel(Model& a, Model& b) {
  ExpectSameState(a.GetState(true), b.GetState(true));
  EXPECT_EQ(a.step(), b.step());
  EXPECT_EQ(a.training(), b.training());
  EXPECT_EQ(a.running_stats_frozen(), b.running_stats_frozen());
  EXPECT_EQ(a.rng().state(), b.rng().state());
}

bool HasEntry(const std::vector<NamedTensor>& state, const std::string& name) {
  for (const NamedTensor& e : state) {
    if (e.name == name) return true;
  }
  return false;
}

std::string ReadFile(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

void WriteFile(const fs::path& p, const std::string& bytes) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

std::vector<std::string> Names(const fs::path& dir) {
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(dir)) names.push_back(e.path().filename().string());
  std::sort(names.begin(), names.end());
  return names;
}

// The offsets at which the file's sections start (each 16-byte frame), read from the format.
std::vector<size_t> SectionOffsets(const std::string& bytes) {
  std::vector<size_t> offsets;
  size_t pos = 12;
  while (pos + 16 <= bytes.size()) {
    offsets.push_back(pos);
    uint64_t len = 0;
    std::memcpy(&len, bytes.data() + pos + 4, 8);
    pos += 16 + len;
  }
  EXPECT_EQ(pos, bytes.size());
  return offsets;
}

// Silences the loader's per-file log lines while a test rejects hundreds of files on purpose.
class QuietLogs {
 public:
  QuietLogs() : level_(spdlog::get_level()) { spdlog::set_level(spdlog::level::off); }
  ~QuietLogs() { spdlog::set_level(level_); }

 private:
  spdlog::level::level_enum level_;
};

class CheckpointTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = (fs::path(::testing::TempDir()) / "normd-ckpt-XXXXXX").string();
    ASSERT_NE(::mkdtemp(tmpl.data()), nullptr);
    root_ = tmpl;
    data_dir_ = (root_ / "data").string();
  }
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(root_, ec);
  }

  // A trained MLP in train mode with frozen statistics off, dropout generator advanced.
  std::unique_ptr<Model> TrainedMlp(int steps) {
    std::unique_ptr<Model> m = Build(MlpConfig(7));
    Train(m.get(), steps, 100);
    return m;
  }

  fs::path root_;
  std::string data_dir_;
};

// --- Round trips --------------------------------------------------------------------------

TEST_F(CheckpointTest, MlpRoundTripIsBitExactAndTrainingContinuesIdentically) {
  std::unique_ptr<Model> original = TrainedMlp(9);
  original->SetMode(/*training=*/true, /*freeze_running_stats=*/true);
  const v1::ModelSpec spec = MlpSpec(7);

  SaveInfo info;
  Status st = SaveCheckpoint(data_dir_, "mlp", spec, *original, 3, &info);
  ASSERT_TRUE(st.ok()) << st.message();
  EXPECT_EQ(info.step, 9u);
  EXPECT_EQ(info.seq, 1u);
  EXPECT_TRUE(fs::exists(info.path));
  EXPECT_EQ(fs::file_size(info.path), info.bytes);

  LoadedCheckpoint loaded;
  LoadReport report;
  st = LoadLatestCheckpoint(data_dir_, "mlp", &loaded, nullptr, &report);
  ASSERT_TRUE(st.ok()) << st.message();
  EXPECT_TRUE(report.rejected.empty());
  EXPECT_EQ(loaded.model_id, "mlp");
  EXPECT_EQ(loaded.step, 9u);
  EXPECT_EQ(loaded.seq, 1u);
  EXPECT_EQ(loaded.path, info.path);
  EXPECT_TRUE(loaded.training);
  EXPECT_TRUE(loaded.running_stats_frozen);
  EXPECT_EQ(loaded.rng_state, original->rng().state());
  EXPECT_GT(loaded.created_unix_micros, 0);
  EXPECT_TRUE(google::protobuf::util::MessageDifferencer::Equals(loaded.spec, spec));
  // Buffers and optimizer slots are in the file, not only parameters.
  EXPECT_TRUE(HasEntry(loaded.state, "1.running_mean"));
  EXPECT_TRUE(HasEntry(loaded.state, "1.num_batches_tracked"));
  EXPECT_TRUE(HasEntry(loaded.state, "optimizer.0.weight.exp_avg_sq"));
  ExpectSameState(loaded.state, original->GetState(true));

  // A model built with another seed has other weights until the checkpoint is applied.
  std::unique_ptr<Model> restored = Build(MlpConfig(12345));
  ASSERT_NE(Bits(restored->GetState(false)[0].values[0]),
            Bits(original->GetState(false)[0].values[0]));
  st = RestoreInto(loaded, restored.get());
  ASSERT_TRUE(st.ok()) << st.message();
  ExpectSameModel(*original, *restored);

  // The next steps (dropout masks included) are the same bit for bit, in every mode.
  for (int round = 0; round < 3; ++round) {
    if (round == 1) {
      original->SetMode(true, false);
      restored->SetMode(true, false);
    }
    const Batch b = MakeBatch(*original, 8, 900 + round);
    ForwardRecord r1, r2;
    TrainResult t1, t2;
    ASSERT_TRUE(original->TrainStep(b.x.view(), b.targets(), &r1, &t1).ok());
    ASSERT_TRUE(restored->TrainStep(b.x.view(), b.targets(), &r2, &t2).ok());
    EXPECT_EQ(t1.step, t2.step);
    uint64_t l1, l2;
    std::memcpy(&l1, &t1.loss, 8);
    std::memcpy(&l2, &t2.loss, 8);
    EXPECT_EQ(l1, l2) << "round " << round;
    ExpectSameModel(*original, *restored);
  }
}

TEST_F(CheckpointTest, ConvRoundTripInEvalModeIsBitExact) {
  std::unique_ptr<Model> original = Build(ConvConfig(3));
  Train(original.get(), 6, 40);
  original->SetMode(/*training=*/false, /*freeze_running_stats=*/false);
  ASSERT_TRUE(SaveCheckpoint(data_dir_, "conv-1", ConvSpec(3), *original, 3, nullptr).ok());

  LoadedCheckpoint loaded;
  ASSERT_TRUE(LoadLatestCheckpoint(data_dir_, "conv-1", &loaded).ok());
  EXPECT_FALSE(loaded.training);
  EXPECT_TRUE(HasEntry(loaded.state, "optimizer.0.weight.momentum_buffer"));
  EXPECT_TRUE(HasEntry(loaded.state, "6.num_batches_tracked"));
  std::unique_ptr<Model> restored = Build(ConvConfig(99));
  const Status st = RestoreInto(loaded, restored.get());
  ASSERT_TRUE(st.ok()) << st.message();
  ExpectSameModel(*original, *restored);

  // Eval-mode outputs agree, then a train step after switching back agrees too.
  const Batch b = MakeBatch(*original, 4, 5);
  ForwardRecord p1, p2;
  ASSERT_TRUE(original->Predict(b.x.view(), &p1).ok());
  ASSERT_TRUE(restored->Predict(b.x.view(), &p2).ok());
  ASSERT_EQ(p1.output().size(), p2.output().size());
  EXPECT_EQ(std::memcmp(p1.output().data(), p2.output().data(), p1.output().size() * 4), 0);
  original->SetMode(true, false);
  restored->SetMode(true, false);
  Train(original.get(), 2, 77);
  Train(restored.get(), 2, 77);
  ExpectSameModel(*original, *restored);
}

TEST_F(CheckpointTest, GroupAndInstanceNormRoundTripIsBitExact) {
  // (2, 6, 6) -> Conv2d(4) -> GroupNorm(2, 4) -> InstanceNorm2d(4, affine, tracked) ->
  // Flatten -> Linear(144 -> 3), MSE, SGD.
  v1::ModelSpec spec;
  spec.add_input_shape(2);
  spec.add_input_shape(6);
  spec.add_input_shape(6);
  v1::Conv2dSpec* conv = spec.add_layers()->mutable_conv2d();
  conv->set_in_channels(2);
  conv->set_out_channels(4);
  conv->set_kernel_size(3);
  conv->set_padding(1);
  v1::GroupNormSpec* gn = spec.add_layers()->mutable_group_norm();
  gn->set_num_groups(2);
  gn->set_num_channels(4);
  v1::InstanceNormSpec* in = spec.add_layers()->mutable_instance_norm2d();
  in->set_num_features(4);
  in->set_affine(true);
  in->set_track_running_stats(true);
  in->set_momentum(0.3f);
  spec.add_layers()->mutable_flatten();
  v1::LinearSpec* lin = spec.add_layers()->mutable_linear();
  lin->set_in_features(144);
  lin->set_out_features(3);
  spec.set_loss(v1::LOSS_MSE);
  spec.mutable_optimizer()->mutable_sgd()->set_lr(0.05f);
  spec.set_seed(5);
  // The same model as a core configuration (the checkpoint library does not convert specs).
  ModelConfig config;
  config.input_shape = {2, 6, 6};
  config.layers.resize(5);
  config.layers[0].kind = LayerKind::kConv2d;
  config.layers[0].conv2d.in_channels = 2;
  config.layers[0].conv2d.out_channels = 4;
  config.layers[0].conv2d.kernel_size = 3;
  config.layers[0].conv2d.padding = 1;
  config.layers[1].kind = LayerKind::kGroupNorm;
  config.layers[1].group_norm.num_groups = 2;
  config.layers[1].group_norm.num_channels = 4;
  config.layers[2].kind = LayerKind::kInstanceNorm2d;
  config.layers[2].instance_norm.num_features = 4;
  config.layers[2].instance_norm.affine = true;
  config.layers[2].instance_norm.track_running_stats = true;
  config.layers[2].instance_norm.momentum = 0.3f;
  config.layers[3].kind = LayerKind::kFlatten;
  config.layers[4].kind = LayerKind::kLinear;
  config.layers[4].linear.in_features = 144;
  config.layers[4].linear.out_features = 3;
  config.loss = LossKind::kMse;
  config.optimizer.sgd.lr = 0.05f;
  config.seed = 5;
  std::unique_ptr<Model> original = Build(config);
  Train(original.get(), 4, 21);
  ASSERT_TRUE(SaveCheckpoint(data_dir_, "norms", spec, *original, 4, nullptr).ok());

  LoadedCheckpoint loaded;
  ASSERT_TRUE(LoadLatestCheckpoint(data_dir_, "norms", &loaded).ok());
  EXPECT_TRUE(HasEntry(loaded.state, "1.weight"));
  EXPECT_TRUE(HasEntry(loaded.state, "2.running_var"));
  EXPECT_TRUE(HasEntry(loaded.state, "2.num_batches_tracked"));
  EXPECT_EQ(loaded.spec.layers(2).instance_norm2d().momentum(), 0.3f);
  ModelConfig other_seed = config;
  other_seed.seed = 99;
  std::unique_ptr<Model> restored = Build(other_seed);
  const Status st = RestoreInto(loaded, restored.get());
  ASSERT_TRUE(st.ok()) << st.message();
  ExpectSameModel(*original, *restored);
  Train(original.get(), 2, 8);
  Train(restored.get(), 2, 8);
  ExpectSameModel(*original, *restored);
}

TEST_F(CheckpointTest, RestoreRejectsAnotherModelsStateAndChangesNothing) {
  std::unique_ptr<Model> conv = Build(ConvConfig(3));
  ASSERT_TRUE(SaveCheckpoint(data_dir_, "conv", ConvSpec(3), *conv, 3, nullptr).ok());
  LoadedCheckpoint loaded;
  ASSERT_TRUE(LoadLatestCheckpoint(data_dir_, "conv", &loaded).ok());

  std::unique_ptr<Model> mlp = TrainedMlp(2);
  std::unique_ptr<Model> witness = TrainedMlp(2);
  const Status st = RestoreInto(loaded, mlp.get());
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("lacks state entry"), std::string::npos) << st.message();
  ExpectSameModel(*mlp, *witness);

  // A checkpoint missing one optimizer slot is refused as well (strict includes them here).
  std::unique_ptr<Model> mlp_src = TrainedMlp(3);
  ASSERT_TRUE(SaveCheckpoint(data_dir_, "mlp", MlpSpec(7), *mlp_src, 3, nullptr).ok());
  ASSERT_TRUE(LoadLatestCheckpoint(data_dir_, "mlp", &loaded).ok());
  loaded.state.pop_back();
  EXPECT_FALSE(RestoreInto(loaded, mlp.get()).ok());
  ExpectSameModel(*mlp, *witness);
}

// --- Directory management -----------------------------------------------------------------

TEST_F(CheckpointTest, KeepsOnlyTheNewestK) {
  std::unique_ptr<Model> m = TrainedMlp(1);
  std::vector<std::string> paths;
  for (int i = 0; i < 6; ++i) {
    Train(m.get(), 1, 500 + i);
    SaveInfo info;
    ASSERT_TRUE(SaveCheckpoint(data_dir_, "m", MlpSpec(7), *m, 3, &info).ok());
    EXPECT_EQ(info.seq, static_cast<uint64_t>(i + 1));
    EXPECT_EQ(info.removed.size(), i >= 3 ? 1u : 0u);
    paths.push_back(fs::path(info.path).filename().string());
  }
  EXPECT_EQ(Names(fs::path(data_dir_) / "m"),
            (std::vector<std::string>{paths[3], paths[4], paths[5]}));
  LoadedCheckpoint loaded;
  ASSERT_TRUE(LoadLatestCheckpoint(data_dir_, "m", &loaded).ok());
  EXPECT_EQ(loaded.step, m->step());
  EXPECT_EQ(loaded.seq, 6u);

  // Saving twice at the same step keeps both (seq orders them); keep_last=1 keeps one.
  SaveInfo info;
  ASSERT_TRUE(SaveCheckpoint(data_dir_, "m", MlpSpec(7), *m, 1, &info).ok());
  EXPECT_EQ(Names(fs::path(data_dir_) / "m"),
            (std::vector<std::string>{fs::path(info.path).filename().string()}));
  EXPECT_EQ(info.step, loaded.step);
  EXPECT_EQ(info.seq, 7u);
  EXPECT_EQ(SaveCheckpoint(data_dir_, "m", MlpSpec(7), *m, 0, nullptr).code(),
            StatusCode::kInvalidArgument);
}

TEST_F(CheckpointTest, TempFilesFromACrashAreIgnoredAndRemoved) {
  std::unique_ptr<Model> m = TrainedMlp(2);
  SaveInfo info;
  ASSERT_TRUE(SaveCheckpoint(data_dir_, "m", MlpSpec(7), *m, 3, &info).ok());
  // A newer, complete save that crashed before its rename was never acknowledged.
  Train(m.get(), 3, 1);
  CheckpointSnapshot newer;
  ASSERT_TRUE(SnapshotCheckpoint("m", MlpSpec(7), *m, &newer).ok());
  const fs::path dir = fs::path(data_dir_) / "m";
  WriteFile(dir / ".tmp-ckpt-00000000000000000005-00000000000000000002.nckpt.1.2.3", newer.bytes);
  WriteFile(dir / ".tmp-ckpt-00000000000000000005-00000000000000000002.nckpt.4.5.6",
            newer.bytes.substr(0, 100));

  LoadedCheckpoint loaded;
  LoadReport report;
  ASSERT_TRUE(LoadLatestCheckpoint(data_dir_, "m", &loaded, nullptr, &report).ok());
  EXPECT_EQ(loaded.step, 2u);
  EXPECT_EQ(loaded.path, info.path);
  EXPECT_EQ(report.temp_files_removed, 2);
  EXPECT_EQ(Names(dir), (std::vector<std::string>{fs::path(info.path).filename().string()}));
}

TEST_F(CheckpointTest, ScanListsModelsWithCheckpointsAndFinishesRemovals) {
  std::vector<std::string> ids;
  ASSERT_TRUE(ScanDataDir(data_dir_, &ids).ok());  // no data dir yet
  EXPECT_TRUE(ids.empty());

  std::unique_ptr<Model> m = TrainedMlp(1);
  ASSERT_TRUE(SaveCheckpoint(data_dir_, "zeta", MlpSpec(7), *m, 3, nullptr).ok());
  ASSERT_TRUE(SaveCheckpoint(data_dir_, "alpha.2", MlpSpec(7), *m, 3, nullptr).ok());
  const fs::path root(data_dir_);
  fs::create_directory(root / "empty");                   // no checkpoint: not a model
  WriteFile(root / "stray-file", "x");                    // not a directory
  fs::create_directory(root / ".deleted-old.1.2.3");      // an interrupted removal
  WriteFile(root / ".deleted-old.1.2.3" / "ckpt-00000000000000000001-00000000000000000001.nckpt",
            "x");
  ASSERT_TRUE(ScanDataDir(data_dir_, &ids).ok());
  EXPECT_EQ(ids, (std::vector<std::string>{"alpha.2", "zeta"}));
  EXPECT_FALSE(fs::exists(root / ".deleted-old.1.2.3"));

  ASSERT_TRUE(RemoveModelFiles(data_dir_, "zeta").ok());
  EXPECT_FALSE(fs::exists(root / "zeta"));
  ASSERT_TRUE(ScanDataDir(data_dir_, &ids).ok());
  EXPECT_EQ(ids, (std::vector<std::string>{"alpha.2"}));
  LoadedCheckpoint loaded;
  EXPECT_EQ(LoadLatestCheckpoint(data_dir_, "zeta", &loaded).code(), StatusCode::kNotFound);
  EXPECT_TRUE(RemoveModelFiles(data_dir_, "zeta").ok());  // already gone
  EXPECT_EQ(Names(root), (std::vector<std::string>{"alpha.2", "empty", "stray-file"}));
}

TEST_F(CheckpointTest, ModelIdsMustBeSafeDirectoryNames) {
  for (const std::string& id :
       std::vector<std::string>{"a", "model-1", "A_b.c-9", "-x", "_", std::string(128, 'x')}) {
    EXPECT_TRUE(ValidateModelIdForDisk(id).ok()) << id;
  }
  for (const std::string& id : std::vector<std::string>{"", "..", ".hidden", ".", "a/b",
                                                       "../etc", "a b", "\xc3\xbc",
                                                       std::string(129, 'x')}) {
    EXPECT_EQ(ValidateModelIdForDisk(id).code(), StatusCode::kInvalidArgument) << id;
  }
  std::unique_ptr<Model> m = TrainedMlp(1);
  EXPECT_EQ(SaveCheckpoint(data_dir_, "../escape", MlpSpec(7), *m, 3, nullptr).code(),
            StatusCode::kInvalidArgument);
  EXPECT_FALSE(fs::exists(root_ / "escape"));
}

TEST_F(CheckpointTest, SaveFailsCleanlyWhenTheDataDirIsAFile) {
  WriteFile(data_dir_, "not a directory");
  std::unique_ptr<Model> m = TrainedMlp(1);
  const Status st = SaveCheckpoint(data_dir_, "m", MlpSpec(7), *m, 3, nullptr);
  EXPECT_FALSE(st.ok());
  EXPECT_NE(st.message().find(data_dir_), std::string::npos) << st.message();
  std::vector<std::string> ids;
  EXPECT_EQ(ScanDataDir(data_dir_, &ids).code(), StatusCode::kInvalidArgument);
}

// --- Corruption ---------------------------------------------------------------------------

TEST_F(CheckpointTest, PreciseErrorsForEachKindOfDamage) {
  std::unique_ptr<Model> m = TrainedMlp(2);
  CheckpointSnapshot snap;
  ASSERT_TRUE(SnapshotCheckpoint("m", MlpSpec(7), *m, &snap).ok());
  const std::string good = snap.bytes;
  const std::vector<size_t> sections = SectionOffsets(good);
  ASSERT_EQ(sections.size(), 4u);
  LoadedCheckpoint out;
  ASSERT_TRUE(DecodeCheckpoint(good, &out).ok());

  auto error = [&](std::string bytes) {
    const Status st = DecodeCheckpoint(bytes, &out);
    EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
    return st.message();
  };
  auto flipped = [&](size_t byte) {
    std::string b = good;
    b[byte] ^= 0x10;
    return b;
  };
  EXPECT_NE(error(flipped(0)).find("bad magic"), std::string::npos);
  EXPECT_NE(error(flipped(8)).find("unsupported format version"), std::string::npos);
  EXPECT_NE(error(flipped(sections[1])).find("type"), std::string::npos);
  EXPECT_NE(error(flipped(sections[2] + 20)).find("the state section at offset " +
                                                  std::to_string(sections[2]) + " fails its CRC"),
            std::string::npos);
  EXPECT_NE(error(flipped(sections[2] + 11)).find("truncated"), std::string::npos);  // length
  EXPECT_NE(error(good.substr(0, sections[3])).find("end section"), std::string::npos);
  EXPECT_NE(error(good.substr(0, 5)).find("shorter than"), std::string::npos);
  EXPECT_NE(error(good + "x").find("1 unexpected bytes after the end section"), std::string::npos);
}

TEST_F(CheckpointTest, EveryBitFlipAndEveryTruncationIsRejected) {
  for (int which = 0; which < 2; ++which) {
    std::unique_ptr<Model> m = which == 0 ? TrainedMlp(4) : Build(ConvConfig(3));
    if (which == 1) Train(m.get(), 3, 9);
    CheckpointSnapshot snap;
    ASSERT_TRUE(SnapshotCheckpoint("m", which == 0 ? MlpSpec(7) : ConvSpec(3), *m, &snap).ok());
    std::string bytes = snap.bytes;
    LoadedCheckpoint out;
    ASSERT_TRUE(DecodeCheckpoint(bytes, &out).ok());

    size_t flips = 0, flips_rejected = 0;
    for (size_t bit = 0; bit < bytes.size() * 8; ++bit) {
      bytes[bit / 8] ^= static_cast<char>(1 << (bit % 8));
      ++flips;
      if (!DecodeCheckpoint(bytes, &out).ok()) ++flips_rejected;
      bytes[bit / 8] ^= static_cast<char>(1 << (bit % 8));
    }
    size_t cuts = 0, cuts_rejected = 0;
    for (size_t len = 0; len < bytes.size(); ++len) {
      ++cuts;
      if (!DecodeCheckpoint(std::string_view(bytes).substr(0, len), &out).ok()) ++cuts_rejected;
    }
    // Bursts: 1 to 16 random bytes overwritten with different random values.
    Rng rng(42 + which);
    size_t bursts = 0, bursts_rejected = 0;
    for (int t = 0; t < 2000; ++t) {
      std::string b = bytes;
      const int n = 1 + static_cast<int>(rng.Next() % 16);
      for (int k = 0; k < n; ++k) {
        const size_t at = rng.Next() % b.size();
        b[at] = static_cast<char>(b[at] ^ (1 + rng.Next() % 255));
      }
      ++bursts;
      if (!DecodeCheckpoint(b, &out).ok()) ++bursts_rejected;
    }
    std::cout << "[ checkpoint ] " << (which == 0 ? "mlp" : "conv") << " file of "
              << bytes.size() << " bytes: bit flips tried " << flips << ", rejected "
              << flips_rejected << "; truncations tried " << cuts << ", rejected "
              << cuts_rejected << "; random bursts tried " << bursts << ", rejected "
              << bursts_rejected << "\n";
    EXPECT_EQ(flips_rejected, flips);
    EXPECT_EQ(cuts_rejected, cuts);
    EXPECT_EQ(bursts_rejected, bursts);
    // The undamaged file still decodes after all that: each rejection was the damage's doing.
    EXPECT_TRUE(DecodeCheckpoint(bytes, &out).ok());
  }
}

// Through the directory: the damaged newest file is set aside and the previous good one loads,
// bit-exactly, for bit flips sampled across the whole file (every frame byte included) and for
// truncations at every section boundary and a dense sample of other lengths.
TEST_F(CheckpointTest, DamagedNewestFallsBackToThePreviousGoodOne) {
  std::unique_ptr<Model> m = TrainedMlp(3);
  SaveInfo old_info, new_info;
  ASSERT_TRUE(SaveCheckpoint(data_dir_, "m", MlpSpec(7), *m, 3, &old_info).ok());
  const std::vector<NamedTensor> old_state = m->GetState(true);
  const auto old_rng = m->rng().state();
  Train(m.get(), 2, 300);
  ASSERT_TRUE(SaveCheckpoint(data_dir_, "m", MlpSpec(7), *m, 3, &new_info).ok());
  const std::string good = ReadFile(new_info.path);
  const fs::path corrupt_dir = fs::path(data_dir_) / "m" / "corrupt";

  std::vector<std::string> damaged;
  std::vector<size_t> bytes_to_flip;
  for (size_t i = 0; i < 12; ++i) bytes_to_flip.push_back(i);
  for (size_t off : SectionOffsets(good)) {
    for (size_t i = 0; i < 16; ++i) bytes_to_flip.push_back(off + i);
    bytes_to_flip.push_back(off + 16);  // first payload byte
  }
  for (size_t i = 0; i < 250; ++i) bytes_to_flip.push_back(i * good.size() / 250);
  for (size_t k = 0; k < bytes_to_flip.size(); ++k) {
    std::string b = good;
    b[bytes_to_flip[k]] ^= static_cast<char>(1 << (k % 8));
    damaged.push_back(std::move(b));
  }
  const size_t flip_cases = damaged.size();
  for (size_t off : SectionOffsets(good)) {
    damaged.push_back(good.substr(0, off));
    damaged.push_back(good.substr(0, off + 16));
  }
  for (size_t len = 0; len < good.size(); len += 1 + good.size() / 150) {
    damaged.push_back(good.substr(0, len));
  }
  damaged.push_back(good.substr(0, good.size() - 1));

  size_t tried = 0, fell_back = 0;
  QuietLogs quiet;
  for (const std::string& b : damaged) {
    WriteFile(new_info.path, b);
    LoadedCheckpoint loaded;
    LoadReport report;
    const Status st = LoadLatestCheckpoint(data_dir_, "m", &loaded, nullptr, &report);
    ++tried;
    if (st.ok() && loaded.path == old_info.path && report.rejected.size() == 1 &&
        report.moved_aside.size() == 1 && !fs::exists(new_info.path) &&
        ReadFile(report.moved_aside[0]) == b) {
      ++fell_back;
    }
    fs::remove_all(corrupt_dir);
  }
  std::cout << "[ checkpoint ] on disk: damaged newest files tried " << tried << " ("
            << flip_cases << " bit flips, " << tried - flip_cases
            << " truncations), fell back to the previous good one " << fell_back << "\n";
  EXPECT_EQ(fell_back, tried);

  LoadedCheckpoint loaded;
  ASSERT_TRUE(LoadLatestCheckpoint(data_dir_, "m", &loaded).ok());
  ExpectSameState(loaded.state, old_state);
  EXPECT_EQ(loaded.step, 3u);
  EXPECT_EQ(loaded.rng_state, old_rng);
}

TEST_F(CheckpointTest, MisnamedOrMisplacedFilesAreRejected) {
  std::unique_ptr<Model> m = TrainedMlp(2);
  SaveInfo a, b;
  ASSERT_TRUE(SaveCheckpoint(data_dir_, "a", MlpSpec(7), *m, 3, &a).ok());
  Train(m.get(), 1, 3);
  ASSERT_TRUE(SaveCheckpoint(data_dir_, "b", MlpSpec(7), *m, 3, &b).ok());
  const fs::path dir_a = fs::path(data_dir_) / "a";
  // b's file copied into a's directory with a newer name: the header names model b.
  fs::copy_file(b.path, dir_a / "ckpt-00000000000000000003-00000000000000000009.nckpt");
  // a's own file renamed to claim another step.
  fs::copy_file(a.path, dir_a / "ckpt-00000000000000000007-00000000000000000008.nckpt");

  LoadedCheckpoint loaded;
  LoadReport report;
  ASSERT_TRUE(LoadLatestCheckpoint(data_dir_, "a", &loaded, nullptr, &report).ok());
  EXPECT_EQ(loaded.path, a.path);
  ASSERT_EQ(report.rejected.size(), 2u);
  EXPECT_NE(report.rejected[0].find("names model 'b'"), std::string::npos) << report.rejected[0];
  EXPECT_NE(report.rejected[1].find("file name says 7"), std::string::npos) << report.rejected[1];
  EXPECT_EQ(Names(dir_a / "corrupt").size(), 2u);
}

TEST_F(CheckpointTest, NothingUsableIsAnErrorNotAModel) {
  std::unique_ptr<Model> m = TrainedMlp(2);
  SaveInfo i1, i2;
  ASSERT_TRUE(SaveCheckpoint(data_dir_, "m", MlpSpec(7), *m, 3, &i1).ok());
  ASSERT_TRUE(SaveCheckpoint(data_dir_, "m", MlpSpec(7), *m, 3, &i2).ok());

  // Intact files that the caller cannot use are skipped, not set aside.
  LoadedCheckpoint loaded;
  LoadReport report;
  int calls = 0;
  auto refuse_newest = [&](const LoadedCheckpoint& c) {
    ++calls;
    return c.seq == 2 ? InvalidArgument("too big for this server") : Status::Ok();
  };
  ASSERT_TRUE(LoadLatestCheckpoint(data_dir_, "m", &loaded, refuse_newest, &report).ok());
  EXPECT_EQ(calls, 2);
  EXPECT_EQ(loaded.seq, 1u);
  EXPECT_EQ(report.skipped.size(), 1u);
  EXPECT_TRUE(fs::exists(i2.path));

  WriteFile(i1.path, "garbage");
  WriteFile(i2.path, ReadFile(i2.path).substr(0, 40));
  const Status st = LoadLatestCheckpoint(data_dir_, "m", &loaded, nullptr, &report);
  EXPECT_EQ(st.code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(st.message().find("none of its 2 checkpoints is usable"), std::string::npos)
      << st.message();
  EXPECT_EQ(report.moved_aside.size(), 2u);
  EXPECT_EQ(LoadLatestCheckpoint(data_dir_, "m", &loaded).code(), StatusCode::kNotFound);
  EXPECT_EQ(LoadLatestCheckpoint(data_dir_, "nobody", &loaded).code(), StatusCode::kNotFound);
}

}  // namespace
}  // namespace normd::server
