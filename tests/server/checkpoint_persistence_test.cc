// Tests of server/checkpoint_persistence.{h,cc}: the Persistence hooks driven the way the
// service drives them (registry, entry locks, OnMutation after each step), with "restarts" that
// build a fresh registry and persistence on the same data directory.
#include "server/checkpoint_persistence.h"

#include <gtest/gtest.h>
#include <stdlib.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <thread>
#include <vector>

#include "core/model.h"
#include "core/rng.h"
#include "server/compute_pool.h"
#include "server/registry.h"

namespace normd::server {
namespace {

namespace fs = std::filesystem;

// 5 -> Linear(8) -> BatchNorm1d -> ReLU -> Dropout(0.2) -> Linear(3), cross-entropy, AdamW.
v1::ModelSpec Spec() {
  v1::ModelSpec s;
  s.add_input_shape(5);
  v1::LinearSpec* lin = s.add_layers()->mutable_linear();
  lin->set_in_features(5);
  lin->set_out_features(8);
  s.add_layers()->mutable_batch_norm1d()->set_num_features(8);
  s.add_layers()->mutable_relu();
  s.add_layers()->mutable_dropout()->set_p(0.2f);
  lin = s.add_layers()->mutable_linear();
  lin->set_in_features(8);
  lin->set_out_features(3);
  s.set_loss(v1::LOSS_CROSS_ENTROPY);
  v1::AdamSpec* adam = s.mutable_optimizer()->mutable_adam();
  adam->set_lr(0.01f);
  adam->set_weight_decay(0.01f);
  adam->set_decoupled_weight_decay(true);
  s.set_seed(11);
  return s;
}

// Everything a checkpoint must bring back, comparable bit for bit.
struct Fingerprint {
  std::vector<std::string> names;
  std::vector<std::vector<uint32_t>> bits;
  uint64_t step = 0;
  bool training = false;
  bool frozen = false;
  std::array<uint64_t, 4> rng{};

  bool operator==(const Fingerprint& o) const {
    return names == o.names && bits == o.bits && step == o.step && training == o.training &&
           frozen == o.frozen && rng == o.rng;
  }
};

Fingerprint Take(ModelEntry& e) {
  std::shared_lock<std::shared_mutex> lock(e.mu());
  Fingerprint f;
  for (const NamedTensor& t : e.model().GetState(true)) {
    f.names.push_back(t.name);
    std::vector<uint32_t> b(t.values.size());
    if (!b.empty()) std::memcpy(b.data(), t.values.data(), b.size() * 4);
    f.bits.push_back(std::move(b));
  }
  f.step = e.model().step();
  f.training = e.model().training();
  f.frozen = e.model().running_stats_frozen();
  f.rng = e.model().rng().state();
  return f;
}

// A server's persistence-relevant parts: pool, registry, persistence.
struct Instance {
  explicit Instance(const CheckpointPersistenceOptions& options)
      : pool(1, 1), registry(RegistryLimits(), nullptr, &pool), persistence(options) {
    registry.set_persistence(&persistence);
    const Status st = persistence.RestoreAll(&registry);
    EXPECT_TRUE(st.ok()) << st.message();
  }
  std::shared_ptr<ModelEntry> Get(const std::string& id) {
    std::shared_ptr<ModelEntry> e;
    const Status st = registry.Find(Principal(), id, &e);
    EXPECT_TRUE(st.ok()) << st.message();
    return e;
  }

  ComputePool pool;
  Registry registry;
  CheckpointPersistence persistence;
};

// One TrainStep as the service runs it: exclusive lock, step, mutation count, hook.
void Step(Instance& in, ModelEntry& e, uint64_t seed) {
  std::unique_lock<std::shared_mutex> lock(e.mu());
  Model& m = e.model();
  Rng rng(seed);
  Tensor x(Shape{6, 5});
  for (int64_t i = 0; i < x.size(); ++i) x.data()[i] = rng.Uniform(-1.0f, 1.0f);
  std::vector<int64_t> labels;
  for (int i = 0; i < 6; ++i) labels.push_back(static_cast<int64_t>(rng.Next() % 3));
  Targets t;
  t.labels = labels.data();
  t.num_labels = 6;
  TrainResult r;
  ASSERT_TRUE(m.TrainStep(x.view(), t, &e.train_record, &r).ok());
  ++e.mutations;
  in.persistence.OnMutation(e, Mutation::kStep);
}

void SetMode(Instance& in, ModelEntry& e, bool training, bool frozen) {
  std::unique_lock<std::shared_mutex> lock(e.mu());
  e.model().SetMode(training, frozen);
  ++e.mutations;
  in.persistence.OnMutation(e, Mutation::kMode);
  e.Publish();
}

class CheckpointPersistenceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = (fs::path(::testing::TempDir()) / "normd-persist-XXXXXX").string();
    ASSERT_NE(::mkdtemp(tmpl.data()), nullptr);
    root_ = tmpl;
    options_.data_dir = (root_ / "data").string();
  }
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(root_, ec);
  }

  std::shared_ptr<ModelEntry> Create(Instance& in, const std::string& id) {
    std::shared_ptr<ModelEntry> e;
    const Status st = in.registry.Create(Principal(), id, Spec(), &e);
    EXPECT_TRUE(st.ok()) << st.message();
    return e;
  }

  // Newest checkpoint file of a model ("" when none).
  std::string Newest(const std::string& id) {
    std::string best;
    const fs::path dir = fs::path(options_.data_dir) / id;
    if (!fs::exists(dir)) return best;
    for (const auto& f : fs::directory_iterator(dir)) {
      const std::string n = f.path().filename().string();
      if (n.rfind("ckpt-", 0) == 0 && n > best) best = n;
    }
    return best;
  }

  fs::path root_;
  CheckpointPersistenceOptions options_;
};

TEST_F(CheckpointPersistenceTest, CreatedModelSurvivesARestartWithoutAnySave) {
  Fingerprint before;
  {
    Instance a(options_);
    before = Take(*Create(a, "m1"));
    EXPECT_EQ(a.persistence.stats().saves, 1u);
    // No OnShutdown: the process "dies" here.
  }
  Instance b(options_);
  EXPECT_EQ(b.persistence.stats().restored, 1u);
  ASSERT_EQ(b.registry.size(), 1);
  EXPECT_TRUE(Take(*b.Get("m1")) == before);
}

TEST_F(CheckpointPersistenceTest, AutosaveEveryNStepsAndTrainingContinuesIdentically) {
  options_.autosave_steps = 3;
  std::map<uint64_t, Fingerprint> states;
  Fingerprint last;
  {
    Instance a(options_);
    std::shared_ptr<ModelEntry> e = Create(a, "m");
    for (int s = 1; s <= 7; ++s) {
      Step(a, *e, 100 + s);
      states[static_cast<uint64_t>(s)] = Take(*e);
    }
    // The destructor lets queued writes finish (a crash might lose the last one; the crash
    // test covers that); the step-7 change is not saved: no OnShutdown.
  }
  EXPECT_EQ(Newest("m").substr(0, 25), "ckpt-00000000000000000006");
  Instance b(options_);
  std::shared_ptr<ModelEntry> e = b.Get("m");
  ASSERT_TRUE(Take(*e) == states[6]);

  // The restored model's step 7 is the original's step 7, dropout masks included.
  Step(b, *e, 107);
  EXPECT_TRUE(Take(*e) == states[7]);
}

TEST_F(CheckpointPersistenceTest, SaveIsDurableAndShutdownSavesWhatChanged) {
  Fingerprint saved, at_shutdown;
  {
    Instance a(options_);
    std::shared_ptr<ModelEntry> e = Create(a, "m");
    std::shared_ptr<ModelEntry> idle = Create(a, "idle");
    Step(a, *e, 1);
    Step(a, *e, 2);
    uint64_t step = 0;
    {
      std::shared_lock<std::shared_mutex> lock(e->mu());
      ASSERT_TRUE(a.persistence.Save(*e, &step).ok());
    }
    EXPECT_EQ(step, 2u);
    saved = Take(*e);
  }
  {
    Instance b(options_);
    std::shared_ptr<ModelEntry> e = b.Get("m");
    ASSERT_TRUE(Take(*e) == saved);
    Step(b, *e, 3);
    SetMode(b, *e, false, false);
    at_shutdown = Take(*e);
    const uint64_t saves_before = b.persistence.stats().saves;
    b.persistence.OnShutdown(&b.registry);
    EXPECT_EQ(b.persistence.stats().saves, saves_before + 1);  // "idle" did not change
  }
  Instance c(options_);
  Fingerprint restored = Take(*c.Get("m"));
  EXPECT_TRUE(restored == at_shutdown);
  EXPECT_FALSE(restored.training);
  EXPECT_EQ(c.registry.size(), 2);
}

TEST_F(CheckpointPersistenceTest, DeleteRemovesTheFilesAndNoQueuedWriteBringsThemBack) {
  options_.autosave_steps = 1;
  {
    Instance a(options_);
    std::shared_ptr<ModelEntry> e = Create(a, "gone");
    Create(a, "kept");
    for (int s = 0; s < 5; ++s) Step(a, *e, 50 + s);  // each queues a write
    {
      std::unique_lock<std::shared_mutex> lock(e->mu());
      ASSERT_TRUE(a.registry.Remove(*e).ok());
    }
    EXPECT_FALSE(fs::exists(fs::path(options_.data_dir) / "gone"));
    a.persistence.OnShutdown(&a.registry);
  }
  EXPECT_FALSE(fs::exists(fs::path(options_.data_dir) / "gone"));
  Instance b(options_);
  EXPECT_EQ(b.registry.size(), 1);
  std::shared_ptr<ModelEntry> e;
  EXPECT_EQ(b.registry.Find(Principal(), "gone", &e).code(), StatusCode::kNotFound);

  // A new model may take the id again, starting from its own state.
  std::shared_ptr<ModelEntry> again = Create(b, "gone");
  EXPECT_EQ(Take(*again).step, 0u);
}

TEST_F(CheckpointPersistenceTest, TimeTriggerSavesAnIdleModel) {
  options_.autosave_interval = std::chrono::milliseconds(20);
  Instance a(options_);
  std::shared_ptr<ModelEntry> e = Create(a, "m");
  Step(a, *e, 9);
  // Nothing else happens to the model: the writer thread must notice it on its own. Bounded
  // wait for an event, not a timing assertion.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (Newest("m").substr(0, 25) != "ckpt-00000000000000000001" &&
         std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_EQ(Newest("m").substr(0, 25), "ckpt-00000000000000000001");
}

TEST_F(CheckpointPersistenceTest, CorruptNewestIsSetAsideAndTheModelStillRestores) {
  Fingerprint first;
  std::string newest;
  {
    Instance a(options_);
    std::shared_ptr<ModelEntry> e = Create(a, "m");
    Step(a, *e, 1);
    uint64_t step;
    {
      std::shared_lock<std::shared_mutex> lock(e->mu());
      ASSERT_TRUE(a.persistence.Save(*e, &step).ok());
    }
    first = Take(*e);
    Step(a, *e, 2);
    a.persistence.OnShutdown(&a.registry);
    newest = Newest("m");
  }
  const fs::path path = fs::path(options_.data_dir) / "m" / newest;
  std::string bytes;
  {
    std::ifstream in(path, std::ios::binary);
    bytes.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }
  bytes[bytes.size() / 2] ^= 0x04;
  std::ofstream(path, std::ios::binary | std::ios::trunc) << bytes;

  Instance b(options_);
  EXPECT_TRUE(Take(*b.Get("m")) == first);
  EXPECT_TRUE(fs::exists(fs::path(options_.data_dir) / "m" / "corrupt" / newest));
}

TEST_F(CheckpointPersistenceTest, UnbuildableCheckpointsAreSkippedNotSetAsideNorFatal) {
  {
    Instance a(options_);
    Create(a, "big");
    Create(a, "small");
  }
  // A newer "big" checkpoint whose spec the server cannot build (as when limits were lowered).
  CheckpointSnapshot snap;
  {
    v1::ModelSpec bad = Spec();
    bad.mutable_layers(0)->mutable_linear()->set_out_features(9);  // BatchNorm expects 8
    ComputePool pool(1, 1);
    Registry scratch(RegistryLimits(), nullptr, &pool);
    std::shared_ptr<ModelEntry> e;
    ASSERT_TRUE(scratch.Create(Principal(), "big", Spec(), &e).ok());
    std::shared_lock<std::shared_mutex> lock(e->mu());
    ASSERT_TRUE(SnapshotCheckpoint("big", bad, e->model(), &snap).ok());
  }
  ASSERT_TRUE(WriteCheckpoint(options_.data_dir, snap, 3, nullptr).ok());

  std::string oldest;
  {
    Instance b(options_);
    // The newest "big" checkpoint is intact but unusable: the older one (written at create,
    // with a good spec) restores, and nothing is set aside.
    EXPECT_EQ(b.registry.size(), 2);
    EXPECT_EQ(Take(*b.Get("big")).step, 0u);
    EXPECT_FALSE(fs::exists(fs::path(options_.data_dir) / "big" / "corrupt"));
  }
  for (const auto& f : fs::directory_iterator(fs::path(options_.data_dir) / "big")) {
    if (f.path().filename().string().find("-00000000000000000001.nckpt") != std::string::npos) {
      fs::remove(f.path());
    }
  }
  // With no usable checkpoint left the model is not restored, the others are, and the
  // server starts.
  Instance c(options_);
  EXPECT_EQ(c.registry.size(), 1);
  EXPECT_EQ(c.persistence.stats().restored, 1u);
  EXPECT_EQ(c.persistence.stats().not_restored, 1u);
  EXPECT_TRUE(fs::exists(fs::path(options_.data_dir) / "big"));  // kept for the operator
}

}  // namespace
}  // namespace normd::server
