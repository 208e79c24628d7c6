// Concurrency of the service's model layer with real model work, for ThreadSanitizer (label
// "concurrency"; `make test` runs these in build-tsan). The registry tests prove the queue's
// ordering with placeholder tasks; these run what the handlers run — forwards, train steps,
// evaluations, state copies, summaries — from several threads at once through
// ModelEntry::Schedule and the ComputePool, the way TrainerService does, minus gRPC (whose
// Debian build is not TSan-instrumented; see tests/sanitizers/README.md).
#include <gtest/gtest.h>

#include <atomic>
#include <cmath>
#include <cstring>
#include <functional>
#include <future>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <thread>
#include <vector>

#include "core/model.h"
#include "normd/v1/normd.pb.h"
#include "server/compute_pool.h"
#include "server/convert.h"
#include "server/metrics.h"
#include "server/registry.h"

namespace normd::server {
namespace {

using Access = ModelEntry::Access;
using Want = ModelEntry::Want;

constexpr int kIn = 16;
constexpr int kClasses = 4;
constexpr int64_t kBatch = 8;

v1::ModelSpec Spec(uint64_t seed) {
  v1::ModelSpec s;
  s.add_input_shape(kIn);
  v1::LinearSpec* l0 = s.add_layers()->mutable_linear();
  l0->set_in_features(kIn);
  l0->set_out_features(32);
  s.add_layers()->mutable_batch_norm1d()->set_num_features(32);
  s.add_layers()->mutable_relu();
  s.add_layers()->mutable_dropout()->set_p(0.1f);
  v1::LinearSpec* l1 = s.add_layers()->mutable_linear();
  l1->set_in_features(32);
  l1->set_out_features(kClasses);
  s.set_loss(v1::LOSS_CROSS_ENTROPY);
  s.mutable_optimizer()->mutable_sgd()->set_lr(0.05f);
  s.mutable_optimizer()->mutable_sgd()->set_momentum(0.9f);
  s.set_seed(seed);
  return s;
}

// A batch and its labels, deterministic in `seed`.
struct Batch {
  std::vector<float> x;
  std::vector<int64_t> labels;
  ConstTensorView view() const { return ConstTensorView{x.data(), Shape{kBatch, kIn}}; }
  Targets targets() const {
    Targets t;
    t.labels = labels.data();
    t.num_labels = kBatch;
    return t;
  }
};

Batch MakeBatch(uint64_t seed) {
  Batch b;
  uint64_t s = seed * 0x9e3779b97f4a7c15ULL + 1;
  for (int64_t i = 0; i < kBatch * kIn; ++i) {
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    b.x.push_back(static_cast<float>(s >> 40) / static_cast<float>(1 << 23) - 1.0f);
  }
  for (int64_t i = 0; i < kBatch; ++i) b.labels.push_back((seed + i) % kClasses);
  return b;
}

bool BitEqual(const std::vector<NamedTensor>& a, const std::vector<NamedTensor>& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    if (a[i].name != b[i].name || a[i].values.size() != b[i].values.size() ||
        std::memcmp(a[i].values.data(), b[i].values.data(), a[i].values.size() * 4) != 0) {
      return false;
    }
  }
  return true;
}

class ConcurrencyTest : public ::testing::Test {
 protected:
  ConcurrencyTest() : pool_(4, 1), registry_(RegistryLimits(), &metrics_, &pool_) {}

  std::shared_ptr<ModelEntry> Create(const std::string& id, uint64_t seed) {
    std::shared_ptr<ModelEntry> e;
    const Status s = registry_.Create(Principal(), id, Spec(seed), &e);
    EXPECT_TRUE(s.ok()) << s.message();
    return e;
  }

  // What TrainerService::RunOnModel does: queue, then hold the lock the queue granted.
  static Status Run(const std::shared_ptr<ModelEntry>& e, Want want,
                    const std::function<Status(ModelEntry&, Access)>& body) {
    std::promise<Status> done;
    const Status queued = e->Schedule(e, want, [&](Access access) {
      Status st;
      if (access == Access::kExclusive) {
        std::unique_lock<std::shared_mutex> lock(e->mu());
        st = body(*e, access);
      } else {
        std::shared_lock<std::shared_mutex> lock(e->mu());
        st = body(*e, access);
      }
      done.set_value(st);
    });
    if (!queued.ok()) return queued;
    return done.get_future().get();
  }

  // The bodies of the handlers (server/service.cc), as far as the model layer goes.
  static Status TrainStep(const std::shared_ptr<ModelEntry>& e, const Batch& b) {
    return Run(e, Want::kExclusive, [&b](ModelEntry& m, Access) {
      TrainResult r;
      NORMD_RETURN_IF_ERROR(m.model().TrainStep(b.view(), b.targets(), &m.train_record, &r));
      if (ModelMetrics* mm = m.metrics()) {
        mm->AddSamples(SampleOp::kTrain, r.samples);
        mm->RecordStep(&r.loss, r.grad_norm);
        mm->RecordDrift(m.train_record, m.model().training());
      }
      ++m.mutations;
      m.PublishForward(m.train_record);
      return Status::Ok();
    });
  }

  static Status Forward(const std::shared_ptr<ModelEntry>& e, const Batch& b,
                        std::vector<float>* out) {
    return Run(e, Want::kByMode, [&](ModelEntry& m, Access access) -> Status {
      if (m.model().training() && access != Access::kExclusive) {
        return Status(StatusCode::kInternal, "train-mode forward scheduled as shared");
      }
      std::unique_ptr<ForwardRecord> rec = m.AcquireRecord();
      Status st = m.model().Forward(b.view(), rec.get());
      if (st.ok()) {
        v1::Tensor wire;
        EncodeTensor(rec->output().data(), rec->output().shape(), /*raw=*/true, &wire);
        out->assign(rec->output().data(), rec->output().data() + rec->output().size());
        if (ModelMetrics* mm = m.metrics()) {
          mm->AddSamples(SampleOp::kForward, rec->batch_size());
          mm->RecordDrift(*rec, m.model().training());
        }
        m.PublishForward(*rec);
      }
      m.ReleaseRecord(std::move(rec));
      return st;
    });
  }

  static Status Evaluate(const std::shared_ptr<ModelEntry>& e, const Batch& b, double* loss) {
    return Run(e, Want::kShared, [&](ModelEntry& m, Access) {
      std::unique_ptr<ForwardRecord> rec = m.AcquireRecord();
      EvalResult r;
      Status st = m.model().Evaluate(b.view(), b.targets(), rec.get(), &r);
      if (st.ok()) *loss = r.loss;
      m.ReleaseRecord(std::move(rec));
      return st;
    });
  }

  static Status GetState(const std::shared_ptr<ModelEntry>& e, std::vector<NamedTensor>* out) {
    return Run(e, Want::kShared, [out](ModelEntry& m, Access) {
      *out = m.model().GetState(true);
      return Status::Ok();
    });
  }

  Metrics metrics_{"concurrency-test"};
  ComputePool pool_;
  Registry registry_;
};

TEST_F(ConcurrencyTest, EvalForwardsOfOneModelRunTogetherAndAgreeBitForBit) {
  std::shared_ptr<ModelEntry> e = Create("m", 1);
  for (int i = 0; i < 5; ++i) ASSERT_TRUE(TrainStep(e, MakeBatch(i)).ok());
  ASSERT_TRUE(Run(e, Want::kExclusive, [](ModelEntry& m, Access) {
                m.model().SetMode(false, false);
                m.Publish();
                return Status::Ok();
              }).ok());
  const Batch b = MakeBatch(99);
  std::vector<float> reference;
  ASSERT_TRUE(Forward(e, b, &reference).ok());

  std::atomic<bool> stop{false};
  std::atomic<int> mismatches{0}, failures{0};
  std::vector<std::thread> clients;
  for (int t = 0; t < 4; ++t) {
    clients.emplace_back([&] {
      for (int i = 0; i < 12; ++i) {
        std::vector<float> out;
        if (!Forward(e, b, &out).ok()) {
          ++failures;
        } else if (out.size() != reference.size() ||
                   std::memcmp(out.data(), reference.data(), out.size() * 4) != 0) {
          ++mismatches;
        }
      }
    });
  }
  // GetModel and ListModels read the published summaries while the forwards run.
  std::thread reader([&] {
    while (!stop.load()) {
      for (const std::shared_ptr<ModelEntry>& m : registry_.List()) {
        v1::Model wire;
        m->ToWire(&wire);
        if (wire.mode() != v1::MODE_EVAL || wire.step() != 5) ++failures;
      }
      metrics_.Render();
    }
  });
  for (std::thread& c : clients) c.join();
  stop = true;
  reader.join();
  EXPECT_EQ(failures.load(), 0);
  EXPECT_EQ(mismatches.load(), 0);
}

TEST_F(ConcurrencyTest, TrainStepsEvaluationsAndStateCopiesInterleaveSafely) {
  std::shared_ptr<ModelEntry> e = Create("m", 2);
  constexpr int kSteps = 24;
  std::atomic<int> trained{0}, failures{0};
  std::atomic<bool> stop{false};
  std::vector<std::thread> threads;
  threads.emplace_back([&] {
    for (int i = 0; i < kSteps; ++i) {
      if (TrainStep(e, MakeBatch(i)).ok())
        ++trained;
      else
        ++failures;
    }
  });
  threads.emplace_back([&] {  // train-mode forwards update the running statistics
    for (int i = 0; i < kSteps; ++i) {
      std::vector<float> out;
      if (!Forward(e, MakeBatch(100 + i), &out).ok()) ++failures;
    }
  });
  threads.emplace_back([&] {
    for (int i = 0; i < kSteps; ++i) {
      double loss = 0;
      if (!Evaluate(e, MakeBatch(200 + i), &loss).ok() || !std::isfinite(loss)) ++failures;
    }
  });
  threads.emplace_back([&] {
    for (int i = 0; i < kSteps; ++i) {
      std::vector<NamedTensor> state;
      if (!GetState(e, &state).ok() || state.empty()) ++failures;
      for (const NamedTensor& t : state) {
        if (!AllFinite(t.values.data(), static_cast<int64_t>(t.values.size()))) ++failures;
      }
    }
  });
  std::thread reader([&] {  // the step a summary reports never goes back
    uint64_t last = 0;
    while (!stop.load()) {
      v1::Model wire;
      e->ToWire(&wire);
      if (wire.step() < last) ++failures;
      last = wire.step();
    }
  });
  for (std::thread& t : threads) t.join();
  stop = true;
  reader.join();
  EXPECT_EQ(failures.load(), 0);
  EXPECT_EQ(trained.load(), kSteps);
  std::shared_lock<std::shared_mutex> lock(e->mu());
  EXPECT_EQ(e->model().step(), static_cast<uint64_t>(kSteps));
}

TEST_F(ConcurrencyTest, ModelsTrainedInParallelEqualTheSameTrainingAlone) {
  constexpr int kModels = 3;
  constexpr int kSteps = 12;
  std::vector<std::shared_ptr<ModelEntry>> entries;
  for (int m = 0; m < kModels; ++m) entries.push_back(Create("m" + std::to_string(m), 10 + m));
  std::vector<std::thread> threads;
  std::atomic<int> failures{0};
  for (int m = 0; m < kModels; ++m) {
    threads.emplace_back([&, m] {
      for (int i = 0; i < kSteps; ++i) {
        if (!TrainStep(entries[m], MakeBatch(1000 * m + i)).ok()) ++failures;
        std::vector<float> out;
        if (!Forward(entries[m], MakeBatch(5000 + i), &out).ok()) ++failures;
      }
    });
  }
  for (std::thread& t : threads) t.join();
  ASSERT_EQ(failures.load(), 0);

  for (int m = 0; m < kModels; ++m) {
    ModelConfig config;
    ASSERT_TRUE(SpecToConfig(Spec(10 + m), &config).ok());
    std::unique_ptr<Model> alone;
    ASSERT_TRUE(Model::Create(config, registry_.ModelLimits(), &alone).ok());
    ForwardRecord rec;
    for (int i = 0; i < kSteps; ++i) {
      const Batch b = MakeBatch(1000 * m + i);
      TrainResult r;
      ASSERT_TRUE(alone->TrainStep(b.view(), b.targets(), &rec, &r).ok());
      const Batch f = MakeBatch(5000 + i);
      ASSERT_TRUE(alone->Forward(f.view(), &rec).ok());
    }
    std::vector<NamedTensor> parallel;
    ASSERT_TRUE(GetState(entries[m], &parallel).ok());
    EXPECT_TRUE(BitEqual(parallel, alone->GetState(true))) << "model " << m;
  }
}

}  // namespace
}  // namespace normd::server
