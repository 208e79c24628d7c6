// core/gradient_buckets: how a data-parallel step's gradients are packed into buckets (every
// parameter once, in the order the backward pass finishes them, a block's parameters together),
// when each bucket's sum starts (once its last layer is done, while the pass goes on), and that
// the sums reach the gradients only after WaitAll. The sums themselves, end to end, are checked
// by data_parallel_test (threads) and tests/mpi (MPI ranks).
#include "core/gradient_buckets.h"

#include <gtest/gtest.h>

#include <map>
#include <memory>
#include <set>
#include <utility>
#include <vector>

#include "core/sequential.h"
#include "tests/core/data_parallel_cases.h"

namespace normd {
namespace {

using namespace ::normd::testing;  // NOLINT: the shared cases

// Two ranks holding the same gradients: a sum doubles every value. A started sum touches its
// data only at WaitAll, as a real non-blocking collective may.
class DeferredDoubling : public Collective {
 public:
  int rank() const override { return 0; }
  int size() const override { return 2; }
  void AllReduceSum(double* data, int64_t n) override {
    for (int64_t i = 0; i < n; ++i) data[i] *= 2;
  }
  void AllReduceSum(float* data, int64_t n) override {
    for (int64_t i = 0; i < n; ++i) data[i] *= 2;
  }
  void AllGather(const double*, int64_t, double*) override { ADD_FAILURE() << "no gather"; }
  void StartAllReduceSum(float* data, int64_t n) override {
    pending.emplace_back(data, n);
    ++started;
  }
  void Progress() override { ++progress_calls; }
  void WaitAll() override {
    for (auto& [data, n] : pending) AllReduceSum(data, n);
    pending.clear();
  }

  std::vector<std::pair<float*, int64_t>> pending;
  int started = 0;
  int progress_calls = 0;
};

std::unique_ptr<Sequential> Net(const ModelConfig& c) {
  std::unique_ptr<Sequential> net;
  Status s = Sequential::Create(c.input_shape, c.layers, c.seed, Sequential::Limits(), &net);
  EXPECT_TRUE(s.ok()) << s.message();
  return net;
}

// Every parameter of `net` in exactly one bucket.
void ExpectEveryParameterOnce(Sequential* net, const GradientBuckets& buckets) {
  std::multiset<Parameter*> packed;
  for (int b = 0; b < buckets.num_buckets(); ++b) {
    for (Parameter* p : buckets.bucket(b)) packed.insert(p);
  }
  const std::vector<Parameter*> all = net->parameters();
  EXPECT_EQ(packed.size(), all.size());
  for (Parameter* p : all) EXPECT_EQ(packed.count(p), 1u) << p->name;
}

// Sets every gradient of `net` to 1, 2, 3, ... (parameter by parameter) and returns the values.
std::map<Parameter*, std::vector<float>> NumberGradients(Sequential* net) {
  std::map<Parameter*, std::vector<float>> values;
  float v = 1.0f;
  for (Parameter* p : net->parameters()) {
    for (int64_t i = 0; i < p->grad.size(); ++i) p->grad.data()[i] = v++;
    values[p].assign(p->grad.data(), p->grad.data() + p->grad.size());
  }
  return values;
}

TEST(GradientBucketsTest, OneBucketPerLayerWithParametersLastLayerFirst) {
  std::unique_ptr<Sequential> net = Net(ResidualCnn());
  // 1 byte: every top-level layer with parameters closes a bucket of its own.
  GradientBuckets buckets(net.get(), 1);
  ExpectEveryParameterOnce(net.get(), buckets);
  // Layers: residual block, ReLU, pool, Flatten, Linear. The Linear finishes first.
  ASSERT_EQ(buckets.num_buckets(), 2);
  const std::vector<Parameter*>& linear = net->layer(4).parameters();
  EXPECT_EQ(buckets.bucket(0), linear);
  // The block's parameters (its body's and its shortcut's) travel together.
  EXPECT_EQ(buckets.bucket(1).size(), net->parameters().size() - linear.size());
}

TEST(GradientBucketsTest, ALargeBucketHoldsEverything) {
  std::unique_ptr<Sequential> net = Net(Mlp());
  GradientBuckets buckets(net.get(), int64_t{1} << 30);
  ASSERT_EQ(buckets.num_buckets(), 1);
  ExpectEveryParameterOnce(net.get(), buckets);
}

TEST(GradientBucketsTest, BucketsStartAsTheirLayersFinishAndSumAtWaitAll) {
  // Linear(6,16), BatchNorm1d, ReLU, Dropout, Linear(16,3): buckets [4], [1], [0].
  std::unique_ptr<Sequential> net = Net(Mlp());
  GradientBuckets buckets(net.get(), 1);
  ASSERT_EQ(buckets.num_buckets(), 3);
  const std::map<Parameter*, std::vector<float>> before = NumberGradients(net.get());
  DeferredDoubling collective;
  buckets.Begin(&collective);
  buckets.LayerDone(4);
  EXPECT_EQ(collective.started, 1);
  buckets.LayerDone(3);
  buckets.LayerDone(2);
  EXPECT_EQ(collective.started, 1);
  EXPECT_EQ(collective.progress_calls, 2);  // layers without parameters let sums advance
  buckets.LayerDone(1);
  EXPECT_EQ(collective.started, 2);
  // Layer 0 is never reported (a backward without an input gradient may stop above it):
  // Finish starts its bucket, waits, and writes the sums back.
  buckets.Finish();
  EXPECT_EQ(collective.started, 3);
  for (Parameter* p : net->parameters()) {
    for (int64_t i = 0; i < p->grad.size(); ++i) {
      ASSERT_EQ(p->grad.data()[i], 2 * before.at(p)[i]) << p->name << "[" << i << "]";
    }
  }
  // A second step reuses the buckets.
  buckets.Begin(&collective);
  buckets.Finish();
  EXPECT_EQ(collective.started, 6);
  const Parameter* first = net->parameters()[0];
  EXPECT_EQ(first->grad.data()[0], 4 * before.at(net->parameters()[0])[0]);
}

TEST(GradientBucketsTest, ALargeGradientIsSummedInPlaceInABucketOfItsOwn) {
  // Linear(6,16), BatchNorm1d, ReLU, Dropout, Linear(16,3). With one large bucket and the
  // in-place size at the first weight's 96 floats, that weight goes alone and everything else
  // shares the bucket that closes below layer 0.
  std::unique_ptr<Sequential> net = Net(Mlp());
  Parameter* first_weight = net->layer(0).parameters()[0];
  ASSERT_EQ(first_weight->grad.size(), 96);
  GradientBuckets buckets(net.get(), int64_t{1} << 30, 96 * sizeof(float));
  ExpectEveryParameterOnce(net.get(), buckets);
  ASSERT_EQ(buckets.num_buckets(), 2);
  EXPECT_EQ(buckets.bucket(0), std::vector<Parameter*>{first_weight});
  EXPECT_EQ(buckets.bucket(1).size(), net->parameters().size() - 1);
  const std::map<Parameter*, std::vector<float>> before = NumberGradients(net.get());
  DeferredDoubling collective;
  buckets.Begin(&collective);
  buckets.LayerDone(4);
  EXPECT_EQ(collective.started, 0);  // the shared bucket waits for layer 0's bias
  buckets.LayerDone(0);
  ASSERT_EQ(collective.started, 2);
  // The large weight's sum runs on the gradient itself, not on a copy.
  EXPECT_EQ(collective.pending[0].first, first_weight->grad.data());
  EXPECT_EQ(collective.pending[0].second, 96);
  buckets.Finish();
  for (Parameter* p : net->parameters()) {
    for (int64_t i = 0; i < p->grad.size(); ++i) {
      ASSERT_EQ(p->grad.data()[i], 2 * before.at(p)[i]) << p->name << "[" << i << "]";
    }
  }
}

// Records the order in which a backward pass reports its layers.
class LayerOrder : public BackwardListener {
 public:
  void LayerDone(int j) override { done.push_back(j); }
  std::vector<int> done;
};

TEST(GradientBucketsTest, BackwardReportsTopLevelLayersLastFirstDownToItsStop) {
  std::unique_ptr<Sequential> net = Net(ResidualCnn());
  const int64_t rows = 3;
  Tensor x(net->input_shape().WithBatch(rows));
  for (int64_t i = 0; i < x.size(); ++i) x.data()[i] = 0.1f * static_cast<float>(i % 7);
  ForwardRecord rec;
  ForwardContext ctx;
  ctx.training = true;
  net->Forward(x.view(), ctx, &rec);
  Tensor dy(net->output_shape().WithBatch(rows));
  dy.Fill(0.5f);
  LayerOrder order;
  net->Backward(&rec, dy.view(), nullptr, &order);
  EXPECT_EQ(order.done, (std::vector<int>{4, 3, 2, 1, 0}));
}

}  // namespace
}  // namespace normd
