// Checkpoints written by older builds keep restoring. tests/checkpoint/fixtures/pre_residual.nckpt
// was written by the normd of commit 492eda7, before residual blocks changed how the model walks
// its layers (tests/checkpoint/fixtures/make_pre_residual_fixture.py); pre_residual.expected
// holds what that build computed after the save. The restored model must compute the same.
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "server/checkpoint.h"
#include "server/convert.h"

namespace normd::server {
namespace {

const std::string kFixtures = std::string(NORMD_SOURCE_DIR) + "/tests/checkpoint/fixtures/";

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  EXPECT_TRUE(in) << path;
  std::stringstream bytes;
  bytes << in.rdbuf();
  return bytes.str();
}

// "name rank d0 d1 ...\nv v v ...\n" records; '#' lines are comments.
std::map<std::string, Tensor> ReadExpected(const std::string& path) {
  std::map<std::string, Tensor> out;
  std::istringstream in(ReadFile(path));
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty() || line[0] == '#') continue;
    std::istringstream head(line);
    std::string name;
    int rank = 0;
    head >> name >> rank;
    Shape shape;
    for (int i = 0; i < rank; ++i) {
      int64_t d = 0;
      head >> d;
      shape.push_back(d);
    }
    Tensor t(shape);
    std::getline(in, line);
    std::istringstream values(line);
    for (int64_t i = 0; i < t.size(); ++i) values >> t.data()[i];
    EXPECT_TRUE(static_cast<bool>(values)) << name;
    out.emplace(name, std::move(t));
  }
  return out;
}

double RelError(const float* a, const float* b, int64_t n) {
  double d = 0.0, r = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    d += (double{a[i]} - b[i]) * (double{a[i]} - b[i]);
    r += double{b[i]} * b[i];
  }
  return r > 0.0 ? std::sqrt(d / r) : std::sqrt(d);
}

TEST(CheckpointCompatTest, PreResidualCheckpointRestoresAndComputesAsBefore) {
  LoadedCheckpoint ckpt;
  Status s = DecodeCheckpoint(ReadFile(kFixtures + "pre_residual.nckpt"), &ckpt);
  ASSERT_TRUE(s.ok()) << s.message();
  EXPECT_EQ(ckpt.model_id, "pre-residual");
  EXPECT_EQ(ckpt.step, 3u);
  ModelConfig config;
  s = SpecToConfig(ckpt.spec, &config);
  ASSERT_TRUE(s.ok()) << s.message();
  std::unique_ptr<Model> model;
  s = Model::Create(config, Sequential::Limits(), &model);
  ASSERT_TRUE(s.ok()) << s.message();
  s = RestoreInto(ckpt, model.get());
  ASSERT_TRUE(s.ok()) << s.message();

  // The state names are the ones the old build wrote, every one of them.
  std::vector<std::string> names;
  for (const NamedTensor& e : model->GetState(/*include_optimizer=*/true)) names.push_back(e.name);
  ASSERT_EQ(names.size(), ckpt.state.size());
  for (size_t i = 0; i < names.size(); ++i) EXPECT_EQ(names[i], ckpt.state[i].name) << i;
  EXPECT_EQ(model->step(), 3u);
  EXPECT_TRUE(model->training());
  const std::vector<LayerOptionsStatus> options = model->layer_options();
  int frozen = 0, untrainable = 0;
  for (const LayerOptionsStatus& o : options) {
    if (o.frozen) {
      EXPECT_EQ(o.name, "bn1");
    }
    if (!o.trainable) {
      EXPECT_EQ(o.name, "4");
    }
    frozen += o.frozen;
    untrainable += !o.trainable;
  }
  EXPECT_EQ(frozen, 1);
  EXPECT_EQ(untrainable, 1);

  const std::map<std::string, Tensor> expected = ReadExpected(kFixtures + "pre_residual.expected");
  ASSERT_EQ(expected.count("input"), 1u);
  const Tensor& x = expected.at("input");
  const Tensor& want = expected.at("forward");
  ForwardRecord rec;
  s = model->Forward(x.view(), &rec);
  ASSERT_TRUE(s.ok()) << s.message();
  ASSERT_EQ(rec.output().shape(), want.shape());
  const double forward_error = RelError(rec.output().data(), want.data(), want.size());
  EXPECT_LE(forward_error, 1e-5);

  std::vector<int64_t> labels;
  for (int64_t i = 0; i < expected.at("labels").size(); ++i) {
    labels.push_back(static_cast<int64_t>(expected.at("labels").data()[i]));
  }
  Targets targets;
  targets.labels = labels.data();
  targets.num_labels = static_cast<int64_t>(labels.size());
  TrainResult r;
  ForwardRecord scratch;
  s = model->TrainStep(x.view(), targets, &scratch, &r);
  ASSERT_TRUE(s.ok()) << s.message();
  const double want_loss = expected.at("train_loss").data()[0];
  EXPECT_LE(std::abs(r.loss - want_loss) / want_loss, 1e-5);
  std::printf("COMPAT forward rel_error=%.3g train_loss %.9g vs %.9g\n", forward_error, r.loss,
              want_loss);
}

}  // namespace
}  // namespace normd::server
