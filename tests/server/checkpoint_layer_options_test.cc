// Checkpoints keep per-layer options and the inference-only flag (CheckpointHeader fields 7
// and 8); checkpoints written before they existed restore with the defaults.
#include <gtest/gtest.h>

#include <cmath>
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
  l0->set_name("fc");
  l0->mutable_linear()->set_in_features(4);
  l0->mutable_linear()->set_out_features(5);
  auto* l1 = spec.add_layers();
  l1->set_name("bn");
  l1->mutable_batch_norm1d()->set_num_features(5);
  spec.add_layers()->mutable_relu();
  auto* l3 = spec.add_layers();
  l3->mutable_linear()->set_in_features(5);
  l3->mutable_linear()->set_out_features(2);
  spec.set_loss(v1::LOSS_CROSS_ENTROPY);
  spec.mutable_optimizer()->mutable_sgd()->set_lr(0.1f);
  return spec;
}

using testing::BuildFromSpec;
using testing::kCorpusCheckpoints;
using testing::ReadCorpusCheckpoint;

TEST(CheckpointLayerOptionsTest, OptionsAndInferenceOnlyRoundTrip) {
  auto m = BuildFromSpec(Spec());
  bool changed = false;
  ASSERT_TRUE(m->SetLayerOptions({{"bn", true, false}, {"3", std::nullopt, false}}, &changed)
                  .ok());
  m->SetMode(false, false);
  m->set_inference_only();
  CheckpointSnapshot snap;
  ASSERT_TRUE(SnapshotCheckpoint("m", Spec(), *m, &snap).ok());
  LoadedCheckpoint ckpt;
  ASSERT_TRUE(DecodeCheckpoint(snap.bytes, &ckpt).ok());
  EXPECT_TRUE(ckpt.inference_only);
  auto restored = BuildFromSpec(ckpt.spec);
  ASSERT_TRUE(RestoreInto(ckpt, restored.get()).ok());
  EXPECT_TRUE(restored->inference_only());
  const auto options = restored->layer_options();
  ASSERT_EQ(options.size(), 3u);
  EXPECT_EQ(options[0].name, "fc");
  EXPECT_FALSE(options[0].frozen);
  EXPECT_TRUE(options[0].trainable);
  EXPECT_TRUE(options[1].frozen);
  EXPECT_FALSE(options[1].trainable);
  EXPECT_EQ(options[2].name, "3");
  EXPECT_FALSE(options[2].trainable);
}

TEST(CheckpointLayerOptionsTest, CommittedOldCheckpointsRestoreWithDefaults) {
  // Written before CheckpointHeader had layer options (tests/fuzz/corpus/checkpoint).
  for (const char* name : kCorpusCheckpoints) {
    LoadedCheckpoint ckpt;
    ASSERT_TRUE(ReadCorpusCheckpoint(name, &ckpt));
    EXPECT_TRUE(ckpt.layer_options.empty()) << name;
    EXPECT_FALSE(ckpt.inference_only) << name;
    auto m = BuildFromSpec(ckpt.spec);
    Status s = RestoreInto(ckpt, m.get());
    ASSERT_TRUE(s.ok()) << name << ": " << s.message();
    EXPECT_FALSE(m->inference_only());
    for (const LayerOptionsStatus& o : m->layer_options()) {
      EXPECT_FALSE(o.frozen) << name;
      EXPECT_TRUE(o.trainable) << name;
    }
  }
}

TEST(CheckpointLayerOptionsTest, BadOptionsAreRefusedLeavingTheModelAsBuilt) {
  auto m = BuildFromSpec(Spec());
  CheckpointSnapshot snap;
  ASSERT_TRUE(SnapshotCheckpoint("m", Spec(), *m, &snap).ok());
  LoadedCheckpoint ckpt;
  ASSERT_TRUE(DecodeCheckpoint(snap.bytes, &ckpt).ok());
  ckpt.layer_options.push_back({"fc", true, std::nullopt});  // a Linear cannot be frozen
  auto fresh = BuildFromSpec(Spec());
  EXPECT_EQ(RestoreInto(ckpt, fresh.get()).code(), StatusCode::kInvalidArgument);
  for (const LayerOptionsStatus& o : fresh->layer_options()) EXPECT_FALSE(o.frozen);
  ckpt.layer_options = {{"bn", true, std::nullopt}};
  ckpt.state[0].values[0] = std::nanf("");  // refused by SetState, after the options applied
  EXPECT_FALSE(RestoreInto(ckpt, fresh.get()).ok());
  for (const LayerOptionsStatus& o : fresh->layer_options()) EXPECT_FALSE(o.frozen);
}

}  // namespace
}  // namespace normd::server
