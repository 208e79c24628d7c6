// Checkpoints keep the training recipe: the spec section carries the schedule, clipping,
// parameter groups and label smoothing, the state section the schedule's progress
// ("optimizer.lr_scheduler.last_epoch"). Checkpoints written before the recipe existed restore
// without a schedule.
#include <gtest/gtest.h>

#include <string>

#include "server/checkpoint.h"
#include "server/convert.h"
#include "tests/server/checkpoint_corpus.h"

namespace normd::server {
namespace {

v1::ModelSpec Spec() {
  v1::ModelSpec spec;
  spec.add_input_shape(4);
  auto* l0 = spec.add_layers();
  l0->mutable_linear()->set_in_features(4);
  l0->mutable_linear()->set_out_features(6);
  spec.add_layers()->mutable_batch_norm1d()->set_num_features(6);
  spec.add_layers()->mutable_relu();
  auto* l3 = spec.add_layers();
  l3->mutable_linear()->set_in_features(6);
  l3->mutable_linear()->set_out_features(3);
  spec.set_loss(v1::LOSS_CROSS_ENTROPY);
  v1::OptimizerSpec* o = spec.mutable_optimizer();
  o->mutable_adam()->set_lr(0.01f);
  o->mutable_adam()->set_weight_decay(0.1f);
  o->mutable_adam()->set_decoupled_weight_decay(true);
  o->mutable_lr_schedule()->mutable_warmup()->set_steps(2);
  o->mutable_lr_schedule()->mutable_cosine()->set_t_max(6);
  o->mutable_clip_grad_norm()->set_max_norm(0.5);
  o->set_no_weight_decay_on_norm_and_bias(true);
  spec.mutable_loss_options()->set_label_smoothing(0.1);
  return spec;
}

using testing::BuildFromSpec;
using testing::kCorpusCheckpoints;
using testing::ReadCorpusCheckpoint;

void Train(Model* m, int steps, uint64_t seed) {
  Rng rng(seed);
  for (int i = 0; i < steps; ++i) {
    Tensor x(Shape{8, 4});
    for (int64_t j = 0; j < x.size(); ++j) x.data()[j] = rng.Uniform(-2.0f, 2.0f);
    std::vector<int64_t> labels(8);
    for (int j = 0; j < 8; ++j) labels[j] = (j + i) % 3;
    Targets t;
    t.labels = labels.data();
    t.num_labels = 8;
    ForwardRecord rec;
    TrainResult r;
    ASSERT_TRUE(m->TrainStep(x.view(), t, &rec, &r).ok());
  }
}

const NamedTensor* Find(const std::vector<NamedTensor>& state, const std::string& name) {
  for (const NamedTensor& e : state) {
    if (e.name == name) return &e;
  }
  return nullptr;
}

TEST(CheckpointRecipeTest, ScheduleProgressRoundTripsAndTrainingContinuesIdentically) {
  auto m = BuildFromSpec(Spec());
  Train(m.get(), 5, 1);
  CheckpointSnapshot snap;
  ASSERT_TRUE(SnapshotCheckpoint("m", Spec(), *m, &snap).ok());
  LoadedCheckpoint ckpt;
  ASSERT_TRUE(DecodeCheckpoint(snap.bytes, &ckpt).ok());
  EXPECT_EQ(ckpt.spec.SerializeAsString(), Spec().SerializeAsString());
  const NamedTensor* progress = Find(ckpt.state, "optimizer.lr_scheduler.last_epoch");
  ASSERT_NE(progress, nullptr);
  EXPECT_EQ(progress->values, std::vector<float>{5.0f});

  auto restored = BuildFromSpec(ckpt.spec);
  EXPECT_NE(restored->learning_rate(), m->learning_rate());  // a fresh schedule is at step 0
  ASSERT_TRUE(RestoreInto(ckpt, restored.get()).ok());
  EXPECT_EQ(restored->learning_rate(), m->learning_rate());
  EXPECT_EQ(restored->config().optimizer.max_grad_norm, 0.5);
  EXPECT_TRUE(restored->config().optimizer.no_weight_decay_on_norm_and_bias);
  EXPECT_EQ(restored->config().label_smoothing, 0.1);
  Train(m.get(), 4, 2);
  Train(restored.get(), 4, 2);
  const std::vector<NamedTensor> a = m->GetState(true), b = restored->GetState(true);
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(a[i].name, b[i].name);
    EXPECT_EQ(a[i].values, b[i].values) << a[i].name;
  }
}

TEST(CheckpointRecipeTest, ASpecWithAScheduleNeedsItsProgressInTheState) {
  auto m = BuildFromSpec(Spec());
  Train(m.get(), 3, 1);
  CheckpointSnapshot snap;
  ASSERT_TRUE(SnapshotCheckpoint("m", Spec(), *m, &snap).ok());
  LoadedCheckpoint ckpt;
  ASSERT_TRUE(DecodeCheckpoint(snap.bytes, &ckpt).ok());
  std::vector<NamedTensor> without;
  for (const NamedTensor& e : ckpt.state) {
    if (e.name != "optimizer.lr_scheduler.last_epoch") without.push_back(e);
  }
  ckpt.state = without;
  auto fresh = BuildFromSpec(ckpt.spec);
  const std::vector<NamedTensor> before = fresh->GetState(true);
  const Status s = RestoreInto(ckpt, fresh.get());
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("lacks state entry 'optimizer.lr_scheduler.last_epoch'"),
            std::string::npos)
      << s.message();
  const std::vector<NamedTensor> after = fresh->GetState(true);
  for (size_t i = 0; i < before.size(); ++i) EXPECT_EQ(before[i].values, after[i].values);
}

TEST(CheckpointRecipeTest, CommittedOldCheckpointsRestoreWithoutARecipe) {
  // Written before the recipe existed (tests/fuzz/corpus/checkpoint).
  for (const char* name : kCorpusCheckpoints) {
    LoadedCheckpoint ckpt;
    ASSERT_TRUE(ReadCorpusCheckpoint(name, &ckpt));
    EXPECT_FALSE(ckpt.spec.optimizer().has_lr_schedule()) << name;
    EXPECT_EQ(Find(ckpt.state, "optimizer.lr_scheduler.last_epoch"), nullptr) << name;
    auto m = BuildFromSpec(ckpt.spec);
    const Status s = RestoreInto(ckpt, m.get());
    ASSERT_TRUE(s.ok()) << name << ": " << s.message();
    const v1::OptimizerSpec& o = ckpt.spec.optimizer();
    EXPECT_EQ(m->learning_rate(), o.has_sgd() ? o.sgd().lr() : o.adam().lr()) << name;
    EXPECT_EQ(m->config().optimizer.max_grad_norm, 0.0) << name;
    EXPECT_EQ(m->config().label_smoothing, 0.0) << name;
  }
}

}  // namespace
}  // namespace normd::server
