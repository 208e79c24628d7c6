// Finite-difference gradient checks of BatchNorm1d / BatchNorm2d over every option that
// changes the backward pass: layout, train vs eval, affine, track_running_stats. Forward
// semantics (running statistics, momentum, drift) are tested in batch_norm_test.cc and the
// PyTorch parity suite.
#include <ostream>
#include <string>

#include "core/batch_norm.h"
#include "gtest/gtest.h"
#include "tests/core/gradcheck.h"

namespace normd {
namespace {

using testing::BuildAndAllocate;
using testing::CheckLayerGradients;
using testing::ExpectGradientsMatch;
using testing::RandomTensor;

struct BatchNormCase {
  bool two_d;
  Shape sample;  // per-sample input; sample[0] is C
  int64_t batch;
  bool training;
  bool affine;
  bool track;
};

std::string CaseName(const BatchNormCase& c) {
  std::string s = c.two_d ? "BatchNorm2d_" : "BatchNorm1d_";
  s += "N" + std::to_string(c.batch);
  for (int64_t d : c.sample) s += "x" + std::to_string(d);
  s += c.training ? "_train" : "_eval";
  s += c.affine ? "_affine" : "_noaffine";
  s += c.track ? "_track" : "_notrack";
  return s;
}

void PrintTo(const BatchNormCase& c, std::ostream* os) { *os << CaseName(c); }

class BatchNormGradTest : public ::testing::TestWithParam<BatchNormCase> {};

TEST_P(BatchNormGradTest, MatchesFiniteDifferences) {
  const BatchNormCase& c = GetParam();
  BatchNormConfig config;
  config.num_features = c.sample[0];
  config.affine = c.affine;
  config.track_running_stats = c.track;
  BatchNorm bn(config, c.two_d);
  ASSERT_TRUE(BuildAndAllocate(&bn, c.sample, 1).ok());

  // Non-trivial gamma/beta and running statistics, so every factor of the gradient shows.
  uint64_t seed = 40;
  for (Parameter* p : bn.parameters()) {
    p->value = RandomTensor(p->value.shape(), ++seed, 0.5f, 1.5f);
  }
  for (StateSlot& slot : bn.state()) {
    if (slot.name == "running_mean") *slot.tensor = RandomTensor(slot.tensor->shape(), 50, -1, 1);
    if (slot.name == "running_var") *slot.tensor = RandomTensor(slot.tensor->shape(), 51, 0.5, 2);
  }
  const int64_t tracked_before = bn.num_batches_tracked();

  const Tensor x = RandomTensor(c.sample.WithBatch(c.batch), 9, -2.0f, 2.0f);
  ForwardContext ctx;
  ctx.training = c.training;
  ctx.update_running_stats = c.training && c.track;
  ASSERT_TRUE(bn.CheckBatch(x.shape(), ctx).ok());
  ExpectGradientsMatch(CheckLayerGradients(&bn, x, ctx), CaseName(c));

  // Forwards leave the update pending; nothing was committed.
  EXPECT_EQ(bn.num_batches_tracked(), tracked_before);
}

std::vector<BatchNormCase> AllCases() {
  std::vector<BatchNormCase> cases;
  const struct {
    bool two_d;
    Shape sample;
    int64_t batch;
  } layouts[] = {
      {false, Shape{3}, 6},        // BatchNorm1d on (N, C)
      {false, Shape{3, 5}, 4},     // BatchNorm1d on (N, C, L)
      {true, Shape{2, 3, 4}, 3},   // BatchNorm2d on (N, C, H, W)
      {true, Shape{2, 2, 3}, 1},   // one sample, several values per channel: allowed
  };
  for (const auto& l : layouts) {
    for (bool training : {true, false}) {
      for (bool affine : {true, false}) {
        for (bool track : {true, false}) {
          cases.push_back(BatchNormCase{l.two_d, l.sample, l.batch, training, affine, track});
        }
      }
    }
  }
  return cases;
}

INSTANTIATE_TEST_SUITE_P(
    AllOptions, BatchNormGradTest, ::testing::ValuesIn(AllCases()),
    [](const ::testing::TestParamInfo<BatchNormCase>& info) { return CaseName(info.param); });

}  // namespace
}  // namespace normd
