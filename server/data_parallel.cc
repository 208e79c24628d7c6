#include "server/data_parallel.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>
#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <shared_mutex>
#include <thread>
#include <utility>

#include "core/loss.h"
#include "server/checkpoint.h"

namespace normd::server {
namespace {

enum class Op : uint32_t {
  kStop = 1,
  kInstall,
  kDelete,
  kTrainStep,
  kForward,
  kBackward,
  kApplyGradients,
  kSetMode,
  kSetState,
  kResetRunningStats,
  kUpdateOptimizer,
  kSetLayerOptions,
  kSync,
  kDigest,
  kEvaluate,
};

constexpr int64_t kNoLimit = std::numeric_limits<int64_t>::max();

std::string KeyOf(const ModelEntry& e) { return e.tenant() + "/" + e.id(); }

void PutU64(std::string* out, uint64_t v) {
  char b[8];
  for (int i = 0; i < 8; ++i) b[i] = static_cast<char>((v >> (8 * i)) & 0xff);
  out->append(b, 8);
}

bool GetU64(const std::string& in, size_t* pos, uint64_t* v) {
  if (in.size() - *pos < 8) return false;
  *v = 0;
  for (int i = 0; i < 8; ++i) {
    *v |= static_cast<uint64_t>(static_cast<unsigned char>(in[*pos + i])) << (8 * i);
  }
  *pos += 8;
  return true;
}

// Rows [begin, begin + n) of a batch view.
ConstTensorView RowsOf(const ConstTensorView& x, int64_t begin, int64_t n) {
  ConstTensorView v = x;
  const Shape per_row = x.shape.DropFirst();
  v.shape = per_row.WithBatch(n);
  v.data = x.data + begin * per_row.NumElements();
  return v;
}

Targets TargetRows(const Targets& t, int64_t begin, int64_t n) {
  Targets out;
  if (t.labels != nullptr || t.num_labels > 0) {
    out.labels = t.labels + begin;
    out.num_labels = n;
  }
  if (t.target.data != nullptr || t.target.shape.rank() > 0) {
    out.target = RowsOf(t.target, begin, n);
  }
  return out;
}

std::string Bytes(const float* data, int64_t n) {
  return std::string(reinterpret_cast<const char*>(data), static_cast<size_t>(n) * sizeof(float));
}

// The whole batch's tensor from every rank's rows (rank order); per_row: the shape of a row.
void Assemble(const std::vector<std::string>& parts, const Shape& per_row, int64_t rows,
              Tensor* out) {
  out->Resize(per_row.WithBatch(rows));
  char* dst = reinterpret_cast<char*>(out->data());
  const size_t capacity = static_cast<size_t>(out->size()) * sizeof(float);
  size_t at = 0;
  for (const std::string& p : parts) {
    const size_t n = std::min(p.size(), capacity - at);
    std::memcpy(dst + at, p.data(), n);
    at += n;
  }
}

// FNV-1a, 64 bits: a digest to compare replicas by, not a defence against an adversary.
struct Fnv {
  uint64_t h = 1469598103934665603ull;
  void Add(const void* data, size_t n) {
    const auto* p = static_cast<const unsigned char*>(data);
    for (size_t i = 0; i < n; ++i) {
      h ^= p[i];
      h *= 1099511628211ull;
    }
  }
  void Add(const std::string& s) {
    const uint64_t n = s.size();
    Add(&n, sizeof n);
    Add(s.data(), s.size());
  }
};

void DigestModel(const std::string& key, const Model& m, Fnv* f) {
  f->Add(key);
  const uint64_t step = m.step();
  f->Add(&step, sizeof step);
  const unsigned char flags[2] = {static_cast<unsigned char>(m.training()),
                                  static_cast<unsigned char>(m.running_stats_frozen())};
  f->Add(flags, 2);
  for (const NamedTensor& t : m.GetState(/*include_optimizer=*/true)) {
    f->Add(t.name);
    const std::string shape = t.shape.ToString();
    f->Add(shape);
    f->Add(t.values.data(), t.values.size() * sizeof(float));
  }
}

std::string DigestString(int models, uint64_t h) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%d:%016" PRIx64, models, h);
  return buf;
}

// A rank's ActivationMoments as bytes for Gather: per node, input then output, each as
// (count, mean, M2) doubles.
std::string MomentsBytes(const std::vector<LayerActivationMoments>& moments) {
  std::vector<double> v;
  for (const LayerActivationMoments& m : moments) {
    for (const ChannelMoments* c : {&m.input, &m.output}) {
      v.push_back(static_cast<double>(c->count));
      v.push_back(c->mean[0]);
      v.push_back(c->m2[0]);
    }
  }
  return std::string(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(double));
}

// The whole batch's statistics from every rank's MomentsBytes, merged in rank order as
// SyncBatchNorm merges its statistics. A part of the wrong size (none: the rank's forward
// failed) is skipped; rank 0's caller has failed then too.
std::vector<LayerActivationStats> CombineLayerStats(const std::vector<std::string>& parts,
                                                    int nodes) {
  std::vector<LayerActivationMoments> total(nodes);
  for (int i = 0; i < nodes; ++i) {
    total[i].layer = i;
    total[i].input = total[i].output = ChannelMoments{0, {0.0}, {0.0}};
  }
  const size_t want = static_cast<size_t>(nodes) * 6 * sizeof(double);
  for (const std::string& p : parts) {
    if (p.size() != want) continue;
    std::vector<double> v(static_cast<size_t>(nodes) * 6);
    std::memcpy(v.data(), p.data(), want);
    for (int i = 0; i < nodes; ++i) {
      const double* d = v.data() + i * 6;
      CombineMoments(&total[i].input,
                     ChannelMoments{static_cast<int64_t>(d[0]), {d[1]}, {d[2]}});
      CombineMoments(&total[i].output,
                     ChannelMoments{static_cast<int64_t>(d[3]), {d[4]}, {d[5]}});
    }
  }
  std::vector<LayerActivationStats> stats;
  for (const LayerActivationMoments& m : total) {
    stats.push_back({m.layer, MeanStdOf(m.input), MeanStdOf(m.output)});
  }
  return stats;
}

// What a TrainStep's targets are, sent in Command::arg.
enum TargetKind : uint64_t { kNoTargets = 0, kLabels = 1, kTarget = 2 };

// A request's tensor without its values: the shape alone (the rows follow by Scatter).
void ShapeOnly(const v1::Tensor& from, v1::Tensor* to) {
  *to->mutable_shape() = from.shape();
}

// The per-row shape of a wire tensor's shape (REQUIRES: rank >= 1, checked by rank 0).
Shape RowShape(const v1::Tensor& t) {
  Shape s;
  for (int i = 1; i < t.shape_size(); ++i) s.push_back(t.shape(i));
  return s;
}

// A view of n rows of shape `row` held in `bytes` (a worker's scattered shard).
ConstTensorView ViewOf(const std::vector<char>& bytes, const Shape& row, int64_t n) {
  return ConstTensorView{reinterpret_cast<const float*>(bytes.data()), row.WithBatch(n)};
}

}  // namespace

// ---- Identity ---------------------------------------------------------------------------------

std::string JobIdentity::Encode() const {
  std::string out;
  for (const auto& [name, value] : items) out += name + "=" + value + "\n";
  return out;
}

std::string CheckJobIdentity(JobChannel* channel, const JobIdentity& mine) {
  std::vector<std::string> all;
  channel->Gather(mine.Encode(), &all);
  std::string verdict;
  if (channel->rank() == 0) {
    for (size_t r = 1; r < all.size() && verdict.empty(); ++r) {
      std::map<std::string, std::string> theirs;
      size_t pos = 0;
      while (pos < all[r].size()) {
        const size_t end = all[r].find('\n', pos);
        const std::string line = all[r].substr(pos, end - pos);
        const size_t eq = line.find('=');
        if (eq != std::string::npos) theirs[line.substr(0, eq)] = line.substr(eq + 1);
        pos = end == std::string::npos ? all[r].size() : end + 1;
      }
      for (const auto& [name, value] : mine.items) {
        auto it = theirs.find(name);
        const std::string other = it == theirs.end() ? "(missing)" : it->second;
        if (other != value) {
          verdict = StrCat("rank ", r, " differs from rank 0 in ", name, ": rank 0 has '", value,
                           "', rank ", r, " has '", other, "'");
          break;
        }
      }
    }
  }
  channel->Broadcast(&verdict);
  return verdict;
}

// ---- Commands ---------------------------------------------------------------------------------

struct DataParallelJob::Command {
  Op op = Op::kStop;
  std::string key;
  uint64_t arg = 0;
  std::vector<uint64_t> ids;
  std::string payload;

  std::string Encode() const {
    std::string out;
    PutU64(&out, static_cast<uint64_t>(op));
    PutU64(&out, key.size());
    out += key;
    PutU64(&out, arg);
    PutU64(&out, ids.size());
    for (uint64_t id : ids) PutU64(&out, id);
    out += payload;
    return out;
  }

  bool Decode(const std::string& in) {
    size_t pos = 0;
    uint64_t v = 0, n = 0;
    if (!GetU64(in, &pos, &v)) return false;
    op = static_cast<Op>(v);
    if (!GetU64(in, &pos, &n) || in.size() - pos < n) return false;
    key = in.substr(pos, n);
    pos += n;
    if (!GetU64(in, &pos, &arg) || !GetU64(in, &pos, &n)) return false;
    ids.clear();
    for (uint64_t i = 0; i < n; ++i) {
      if (!GetU64(in, &pos, &v)) return false;
      ids.push_back(v);
    }
    payload = in.substr(pos);
    return true;
  }
};

// A worker's shard of a batch sent by SendBatch: its rows, their targets, where they sit. The
// buffers are kept from batch to batch (DataParallelJob::shard_batch_).
struct DataParallelJob::ShardBatch {
  std::vector<char> x, labels, target;  // the scattered bytes the views below point into
  ConstTensorView input;
  Targets targets;
  DataParallelShard shard;
};

struct DataParallelJob::Replica {
  std::unique_ptr<Model> model;
  ForwardRecord train_record;
  ForwardRecord eval_record;     // Evaluate's
  ForwardRecord forward_record;  // a Forward's that is not retained
  std::map<uint64_t, std::unique_ptr<ForwardRecord>> retained;
};

DataParallelJob::DataParallelJob(JobChannel* channel, const Sequential::Limits& limits)
    : channel_(channel), limits_(limits), timed_(channel->collective()),
      shard_batch_(std::make_unique<ShardBatch>()) {}

namespace {
using Clock = std::chrono::steady_clock;
double Since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}
}  // namespace

void DataParallelJob::TimedCollective::AllReduceSum(double* data, int64_t n) {
  const auto t = Clock::now();
  inner_->AllReduceSum(data, n);
  seconds_ += Since(t);
  bytes_ += static_cast<double>(n) * sizeof(double);
}

void DataParallelJob::TimedCollective::AllReduceSum(float* data, int64_t n) {
  const auto t = Clock::now();
  inner_->AllReduceSum(data, n);
  seconds_ += Since(t);
  bytes_ += static_cast<double>(n) * sizeof(float);
}

void DataParallelJob::TimedCollective::AllGather(const double* in, int64_t n, double* out) {
  const auto t = Clock::now();
  inner_->AllGather(in, n, out);
  seconds_ += Since(t);
  bytes_ += static_cast<double>(n) * sizeof(double);
}

void DataParallelJob::TimedCollective::StartAllReduceSum(float* data, int64_t n) {
  const auto t = Clock::now();
  inner_->StartAllReduceSum(data, n);
  seconds_ += Since(t);
  bytes_ += static_cast<double>(n) * sizeof(float);
}

void DataParallelJob::TimedCollective::Progress() {
  const auto t = Clock::now();
  inner_->Progress();
  seconds_ += Since(t);
}

void DataParallelJob::TimedCollective::WaitAll() {
  const auto t = Clock::now();
  inner_->WaitAll();
  seconds_ += Since(t);
}

class DataParallelJob::OpTimer {
 public:
  explicit OpTimer(DataParallelJob* job) : job_(job), start_(Clock::now()) { job_->timed_.Reset(); }
  ~OpTimer() {
    if (job_->metrics_ == nullptr) return;
    const double total = Since(start_);
    const double collective = job_->timed_.seconds();
    job_->metrics_->RecordDataParallelStep(std::max(0.0, total - collective), collective,
                                           job_->timed_.bytes());
  }

 private:
  DataParallelJob* const job_;
  const Clock::time_point start_;
};

// job_mu_, held, with the time it was taken for the watchdog.
class DataParallelJob::JobLock {
 public:
  explicit JobLock(DataParallelJob* job) : job_(job), lock_(job->job_mu_) {
    job_->busy_since_ns_.store(NowNanos(), std::memory_order_relaxed);
  }
  ~JobLock() { job_->busy_since_ns_.store(0, std::memory_order_relaxed); }

  static int64_t NowNanos() {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(
               Clock::now().time_since_epoch()).count();
  }

 private:
  DataParallelJob* const job_;
  std::lock_guard<std::mutex> lock_;
};

DataParallelJob::~DataParallelJob() {
  if (watchdog_.joinable()) {
    {
      std::lock_guard<std::mutex> lock(watchdog_mu_);
      watchdog_stop_ = true;
    }
    watchdog_cv_.notify_all();
    watchdog_.join();
  }
}

void DataParallelJob::StartWatchdog(std::chrono::milliseconds timeout) {
  if (timeout.count() <= 0 || channel_->size() == 1 || watchdog_.joinable()) return;
  watchdog_ = std::thread([this, timeout] {
    const auto period = std::min<std::chrono::milliseconds>(timeout / 4,
                                                            std::chrono::milliseconds(1000));
    const int64_t limit = std::chrono::duration_cast<std::chrono::nanoseconds>(timeout).count();
    std::unique_lock<std::mutex> lock(watchdog_mu_);
    while (!watchdog_cv_.wait_for(lock, period, [this] { return watchdog_stop_; })) {
      const int64_t since = busy_since_ns_.load(std::memory_order_relaxed);
      if (since == 0 || JobLock::NowNanos() - since <= limit) continue;
      // Rank 0 has waited that long in one operation: a rank stopped, hangs or cannot be
      // reached (a dead one ends the job through its launcher; a hung one never would). The
      // checkpoints on disk are whole (each is written aside and renamed), so ending the job
      // loses nothing acknowledged as saved, and the launcher (mpirun, the MPIJob) sees a
      // failed job and can start it again.
      spdlog::critical("event=job_failed error=\"an operation of this data-parallel job has "
                       "waited {:.1f} s for the other ranks (--job-stall-timeout {:.1f} s): a "
                       "rank has stopped, hangs or cannot be reached; ending the job\"",
                       static_cast<double>(JobLock::NowNanos() - since) * 1e-9,
                       static_cast<double>(timeout.count()) * 1e-3);
      spdlog::default_logger()->flush();
      std::_Exit(kExitStalled);
    }
  });
}

void DataParallelJob::Send(const Command& c) {
  std::string bytes = c.Encode();
  channel_->Broadcast(&bytes);
}

DataParallelShard DataParallelJob::ShardOf(int64_t rows, int64_t* n) {
  DataParallelShard shard{&timed_, rows, 0};
  *n = ShardRows(rows, channel_->size(), channel_->rank(), &shard.row_offset);
  return shard;
}

void DataParallelJob::ScatterRows(const void* data, int64_t rows, int64_t row_bytes,
                                  std::vector<char>* out) {
  const int world = channel_->size();
  std::vector<int64_t> counts, offsets;
  int64_t mine = 0;
  for (int r = 0; r < world; ++r) {
    int64_t offset = 0;
    const int64_t n = ShardRows(rows, world, r, &offset);
    counts.push_back(n * row_bytes);
    offsets.push_back(offset * row_bytes);
    if (r == channel_->rank()) mine = n * row_bytes;
  }
  if (channel_->rank() == 0) {
    channel_->Scatter(data, counts, offsets, nullptr, 0);
  } else {
    out->resize(static_cast<size_t>(mine));
    channel_->Scatter(nullptr, {}, {}, out->data(), mine);
  }
}

Status DataParallelJob::Snapshot(ModelEntry& e, std::string* bytes) {
  CheckpointSnapshot snap;
  NORMD_RETURN_IF_ERROR(SnapshotCheckpoint(e.id(), e.spec(), e.model(), &snap));
  *bytes = std::move(snap.bytes);
  return Status::Ok();
}

// ---- Rank 0: compute --------------------------------------------------------------------------

void DataParallelJob::SendBatch(Command* command, const v1::Tensor& input_wire,
                                const v1::Tensor* target_wire, const ConstTensorView& x,
                                const Targets& t) {
  Command& c = *command;
  c.arg = t.num_labels > 0 ? kLabels : (t.target.shape.rank() > 0 ? kTarget : kNoTargets);
  v1::EvaluateRequest shapes;  // the batch without its values; the rows follow
  ShapeOnly(input_wire, shapes.mutable_input());
  if (c.arg == kTarget) ShapeOnly(*target_wire, shapes.mutable_target());
  c.payload = shapes.SerializeAsString();
  Send(c);
  ScatterRows(x.data, x.rows(), x.shape.DropFirst().NumElements() * sizeof(float), nullptr);
  if (c.arg == kLabels) ScatterRows(t.labels, x.rows(), sizeof(int64_t), nullptr);
  if (c.arg == kTarget) {
    ScatterRows(t.target.data, x.rows(),
                t.target.shape.DropFirst().NumElements() * sizeof(float), nullptr);
  }
}

Status DataParallelJob::TrainStep(ModelEntry& e, const v1::TrainStepRequest& req,
                                  const DecodedTensor& input, const DecodedTargets& targets,
                                  TrainResult* result) {
  Model& m = e.model();
  const ConstTensorView x = input.view();
  NORMD_RETURN_IF_ERROR(m.CheckCanTrain("TrainStep"));
  NORMD_RETURN_IF_ERROR(m.CheckInput(x, m.training()));
  NORMD_RETURN_IF_ERROR(ValidateTargets(m.config().loss,
                                        m.net().output_shape().WithBatch(x.rows()),
                                        targets.targets));
  JobLock lock(this);
  OpTimer timer(this);
  Command c;
  c.op = Op::kTrainStep;
  c.key = KeyOf(e);
  SendBatch(&c, req.input(), &req.target(), x, targets.targets);
  int64_t n = 0;
  const DataParallelShard shard = ShardOf(x.rows(), &n);
  return m.TrainStep(RowsOf(x, shard.row_offset, n),
                     TargetRows(targets.targets, shard.row_offset, n),
                     &e.train_record, result, shard);
}

Status DataParallelJob::Evaluate(ModelEntry& e, const v1::EvaluateRequest& req,
                                 const DecodedTensor& input, const DecodedTargets& targets,
                                 ForwardRecord* rec, EvalResult* result) {
  const Model& m = e.model();
  const ConstTensorView x = input.view();
  NORMD_RETURN_IF_ERROR(m.CheckInput(x, false));
  NORMD_RETURN_IF_ERROR(ValidateTargets(m.config().loss,
                                        m.net().output_shape().WithBatch(x.rows()),
                                        targets.targets));
  JobLock lock(this);
  OpTimer timer(this);
  Command c;
  c.op = Op::kEvaluate;
  c.key = KeyOf(e);
  SendBatch(&c, req.input(), &req.target(), x, targets.targets);
  int64_t n = 0;
  const DataParallelShard shard = ShardOf(x.rows(), &n);
  return m.Evaluate(RowsOf(x, shard.row_offset, n),
                    TargetRows(targets.targets, shard.row_offset, n), rec, result, shard);
}

Status DataParallelJob::Forward(ModelEntry& e, const v1::ForwardRequest& req,
                                const DecodedTensor& input, ForwardRecord* rec, Tensor* output,
                                std::vector<LayerActivationStats>* layer_stats) {
  Model& m = e.model();
  const ConstTensorView x = input.view();
  NORMD_RETURN_IF_ERROR(m.CheckInput(x, m.training()));
  JobLock lock(this);
  OpTimer timer(this);
  Command c;
  c.op = Op::kForward;
  c.key = KeyOf(e);
  if (req.retain_for_backward()) {
    c.arg = e.PeekNextForwardId();
    c.ids = e.RetainedIds();
  }
  v1::ForwardRequest shapes;  // the request without its values; the rows follow
  ShapeOnly(req.input(), shapes.mutable_input());
  shapes.set_retain_for_backward(req.retain_for_backward());
  shapes.set_layer_stats(req.layer_stats());
  c.payload = shapes.SerializeAsString();
  Send(c);
  ScatterRows(x.data, x.rows(), x.shape.DropFirst().NumElements() * sizeof(float), nullptr);
  int64_t n = 0;
  const DataParallelShard shard = ShardOf(x.rows(), &n);
  const Status s = m.Forward(RowsOf(x, shard.row_offset, n), rec, shard);
  std::vector<std::string> parts;
  channel_->Gather(s.ok() ? Bytes(rec->output().data(), rec->output().size()) : std::string(),
                   &parts);
  if (s.ok()) Assemble(parts, m.net().output_shape(), x.rows(), output);
  if (req.layer_stats()) {
    channel_->Gather(s.ok() ? MomentsBytes(m.net().ActivationMoments(*rec)) : std::string(),
                     &parts);
    if (s.ok() && layer_stats != nullptr) {
      *layer_stats = CombineLayerStats(parts, m.net().num_nodes());
    }
  }
  return s;
}

Status DataParallelJob::Backward(ModelEntry& e, const v1::BackwardRequest& req,
                                 ForwardRecord* rec, const ConstTensorView& grad_output,
                                 Tensor* grad_input) {
  Model& m = e.model();
  NORMD_RETURN_IF_ERROR(m.CheckCanTrain("Backward"));
  // The shape and finiteness checks of Model::Backward, on the whole batch (the core sees a
  // shard); staleness is the same on every replica and left to the core.
  const int64_t rows = rec->context().shard.global_rows;
  const Shape want = rec->output().shape().DropFirst().WithBatch(rows);
  if (grad_output.shape != want) {
    return InvalidArgument("grad_output has shape ", grad_output.shape.ToString(),
                           " but the forward's output has shape ", want.ToString());
  }
  if (!AllFinite(grad_output.data, grad_output.size())) {
    return InvalidArgument("grad_output contains non-finite values (NaN or Inf)");
  }
  JobLock lock(this);
  OpTimer timer(this);
  Command c;
  c.op = Op::kBackward;
  c.key = KeyOf(e);
  c.arg = req.forward_id();
  c.ids = e.RetainedIds();
  v1::BackwardRequest shapes;  // the request without its values; the rows follow
  ShapeOnly(req.grad_output(), shapes.mutable_grad_output());
  shapes.set_return_grad_input(req.return_grad_input());
  c.payload = shapes.SerializeAsString();
  Send(c);
  ScatterRows(grad_output.data, rows, want.DropFirst().NumElements() * sizeof(float), nullptr);
  const DataParallelShard& shard = rec->context().shard;
  const int64_t n = rec->batch_size();
  Tensor mine;
  const Status s = m.Backward(rec, RowsOf(grad_output, shard.row_offset, n),
                              grad_input != nullptr ? &mine : nullptr);
  std::vector<std::string> parts;
  channel_->Gather(s.ok() && grad_input != nullptr ? Bytes(mine.data(), mine.size())
                                                   : std::string(),
                   &parts);
  if (s.ok() && grad_input != nullptr) {
    Assemble(parts, rec->input().shape.DropFirst(), rows, grad_input);
  }
  return s;
}

Status DataParallelJob::ApplyGradients(ModelEntry& e, StepResult* result) {
  NORMD_RETURN_IF_ERROR(e.model().CheckCanTrain("ApplyGradients"));
  JobLock lock(this);
  OpTimer timer(this);
  Command c;
  c.op = Op::kApplyGradients;
  c.key = KeyOf(e);
  Send(c);
  return e.model().ApplyGradients(result, &timed_);
}

// ---- Rank 0: control --------------------------------------------------------------------------

void DataParallelJob::Replicate(ModelEntry& e, Control op, const google::protobuf::Message& req) {
  Command c;
  switch (op) {
    case Control::kSetMode: c.op = Op::kSetMode; break;
    case Control::kSetState: c.op = Op::kSetState; break;
    case Control::kResetRunningStats: c.op = Op::kResetRunningStats; break;
    case Control::kUpdateOptimizer: c.op = Op::kUpdateOptimizer; break;
    case Control::kSetLayerOptions: c.op = Op::kSetLayerOptions; break;
  }
  c.key = KeyOf(e);
  c.payload = req.SerializeAsString();
  JobLock lock(this);
  Send(c);
}

void DataParallelJob::SyncState(ModelEntry& e) {
  Command c;
  c.op = Op::kSync;
  c.key = KeyOf(e);
  const Status s = Snapshot(e, &c.payload);
  if (!s.ok()) {
    // Snapshotting a held model cannot fail short of memory; a job whose replicas would differ
    // must not go on.
    spdlog::critical("event=job_failed error=\"cannot snapshot model {} for the workers: {}\"",
                     e.name(), s.message());
    std::_Exit(3);
  }
  JobLock lock(this);
  Send(c);
}

std::string DigestRegistry(Registry* registry, int* models,
                           std::vector<std::shared_lock<std::shared_mutex>>* locks) {
  std::vector<std::pair<std::string, std::shared_ptr<ModelEntry>>> entries;
  for (const std::shared_ptr<ModelEntry>& e : registry->List()) entries.emplace_back(KeyOf(*e), e);
  std::sort(entries.begin(), entries.end(),
            [](const auto& a, const auto& b) { return a.first < b.first; });
  for (auto& [key, e] : entries) locks->emplace_back(e->mu());
  Fnv f;
  *models = 0;
  for (auto& [key, e] : entries) {
    if (e->deleted()) continue;
    DigestModel(key, e->model(), &f);
    ++*models;
  }
  return DigestString(*models, f.h);
}

Status DataParallelJob::CheckReplicas(Registry* registry, v1::CheckReplicasResponse* out) {
  // Entry locks before the job mutex (a holder of an entry lock may be waiting for the mutex),
  // and held until the workers have the command: no change can slip in between rank 0's digest
  // and theirs.
  std::vector<std::shared_lock<std::shared_mutex>> locks;
  int models = 0;
  const std::string mine = DigestRegistry(registry, &models, &locks);
  std::vector<std::string> digests;
  {
    JobLock lock(this);
    Command c;
    c.op = Op::kDigest;
    Send(c);
    channel_->Gather(mine, &digests);
  }
  out->set_world_size(channel_->size());
  out->set_models(models);
  bool same = true;
  for (const std::string& d : digests) {
    out->add_digests(d);
    same = same && d == digests[0];
  }
  out->set_consistent(same);
  return Status::Ok();
}

void DataParallelJob::StopWorkers() {
  JobLock lock(this);
  if (stopped_) return;
  stopped_ = true;
  Command c;
  c.op = Op::kStop;
  Send(c);
}

// ---- Persistence ------------------------------------------------------------------------------

Status DataParallelJob::RestoreAll(Registry* registry) {
  if (inner_ != nullptr) NORMD_RETURN_IF_ERROR(inner_->RestoreAll(registry));
  for (const std::shared_ptr<ModelEntry>& e : registry->List()) {
    std::shared_lock<std::shared_mutex> entry_lock(e->mu());
    Command c;
    c.op = Op::kInstall;
    c.key = KeyOf(*e);
    NORMD_RETURN_IF_ERROR(Snapshot(*e, &c.payload));
    JobLock lock(this);
    Send(c);
  }
  return Status::Ok();
}

Status DataParallelJob::OnCreate(ModelEntry& entry) {
  if (inner_ != nullptr) NORMD_RETURN_IF_ERROR(inner_->OnCreate(entry));
  Command c;
  c.op = Op::kInstall;
  c.key = KeyOf(entry);
  NORMD_RETURN_IF_ERROR(Snapshot(entry, &c.payload));
  JobLock lock(this);
  Send(c);
  return Status::Ok();
}

void DataParallelJob::OnMutation(ModelEntry& entry, Mutation what) {
  if (inner_ != nullptr) inner_->OnMutation(entry, what);
  if (what == Mutation::kAdapt) SyncState(entry);
}

Status DataParallelJob::Save(ModelEntry& entry, uint64_t* step) {
  if (inner_ == nullptr) {
    return FailedPrecondition(
        "persistence not configured: this server keeps models in memory only");
  }
  return inner_->Save(entry, step);
}

Status DataParallelJob::OnDelete(ModelEntry& entry) {
  if (inner_ != nullptr) NORMD_RETURN_IF_ERROR(inner_->OnDelete(entry));
  Command c;
  c.op = Op::kDelete;
  c.key = KeyOf(entry);
  JobLock lock(this);
  Send(c);
  return Status::Ok();
}

void DataParallelJob::OnShutdown(Registry* registry) {
  if (inner_ != nullptr) inner_->OnShutdown(registry);
}

// ---- Workers ----------------------------------------------------------------------------------

int DataParallelJob::RunWorker() {
  spdlog::info("event=worker_ready rank={} world_size={}", channel_->rank(), channel_->size());
  for (;;) {
    std::string bytes;
    channel_->Broadcast(&bytes);
    Command c;
    if (!c.Decode(bytes)) {
      spdlog::critical("event=job_failed rank={} error=\"undecodable command ({} bytes)\"",
                       channel_->rank(), bytes.size());
      return 3;
    }
    if (c.op == Op::kStop) break;
    Execute(c);
  }
  spdlog::info("event=worker_stopped rank={} models={}", channel_->rank(), replicas_.size());
  return 0;
}

DataParallelJob::Replica* DataParallelJob::Find(const std::string& key, const char* op) {
  auto it = replicas_.find(key);
  if (it != replicas_.end()) return it->second.get();
  spdlog::critical("event=job_failed rank={} error=\"{} names model {}, which this rank does not "
                   "hold: the replicas differ\"",
                   channel_->rank(), op, key);
  std::_Exit(3);
}

namespace {

// A worker's call that failed where rank 0's succeeded (or the reverse would have sent no
// command): the replicas differ and the job must not go on.
void MustAgree(int rank, const char* op, const std::string& key, const Status& s) {
  if (s.ok()) return;
  spdlog::critical("event=job_failed rank={} error=\"{} on model {} failed here but not on rank "
                   "0: {}\"", rank, op, key, s.message());
  std::_Exit(3);
}

template <typename T>
T Parse(int rank, const char* op, const std::string& payload) {
  T msg;
  if (!msg.ParseFromString(payload)) MustAgree(rank, op, "", InvalidArgument("unparsable request"));
  return msg;
}

}  // namespace

void DataParallelJob::ReceiveBatch(const Command& c, const char* op, ShardBatch* b) {
  const auto req = Parse<v1::EvaluateRequest>(channel_->rank(), op, c.payload);
  const int64_t rows = req.input().shape(0);
  const Shape row = RowShape(req.input());
  ScatterRows(nullptr, rows, row.NumElements() * sizeof(float), &b->x);
  int64_t n = 0;
  b->shard = ShardOf(rows, &n);
  b->input = ViewOf(b->x, row, n);
  b->targets = Targets();
  if (c.arg == kLabels) {
    ScatterRows(nullptr, rows, sizeof(int64_t), &b->labels);
    b->targets.labels = reinterpret_cast<const int64_t*>(b->labels.data());
    b->targets.num_labels = n;
  } else if (c.arg == kTarget) {
    const Shape target_row = RowShape(req.target());
    ScatterRows(nullptr, rows, target_row.NumElements() * sizeof(float), &b->target);
    b->targets.target = ViewOf(b->target, target_row, n);
  }
}

void DataParallelJob::Execute(const Command& c) {
  const int rank = channel_->rank();
  switch (c.op) {
    case Op::kStop:
      return;
    case Op::kInstall: {
      LoadedCheckpoint ckpt;
      MustAgree(rank, "install", c.key, DecodeCheckpoint(c.payload, &ckpt));
      ModelConfig config;
      MustAgree(rank, "install", c.key, SpecToConfig(ckpt.spec, &config));
      auto r = std::make_unique<Replica>();
      MustAgree(rank, "install", c.key, Model::Create(config, limits_, &r->model));
      MustAgree(rank, "install", c.key, RestoreInto(ckpt, r->model.get()));
      replicas_[c.key] = std::move(r);
      return;
    }
    case Op::kDelete:
      replicas_.erase(c.key);
      return;
    case Op::kTrainStep: {
      Replica* r = Find(c.key, "TrainStep");
      ShardBatch& b = *shard_batch_;
      ReceiveBatch(c, "TrainStep", &b);
      TrainResult result;
      // A refused non-finite step is refused on every rank alike: not a disagreement.
      const Status s = r->model->TrainStep(b.input, b.targets, &r->train_record, &result,
                                           b.shard);
      if (!s.ok() && s.code() != StatusCode::kFailedPrecondition) {
        MustAgree(rank, "TrainStep", c.key, s);
      }
      return;
    }
    case Op::kEvaluate: {
      Replica* r = Find(c.key, "Evaluate");
      ShardBatch& b = *shard_batch_;
      ReceiveBatch(c, "Evaluate", &b);
      EvalResult result;
      MustAgree(rank, "Evaluate", c.key,
                r->model->Evaluate(b.input, b.targets, &r->eval_record, &result, b.shard));
      return;
    }
    case Op::kForward: {
      Replica* r = Find(c.key, "Forward");
      const auto req = Parse<v1::ForwardRequest>(rank, "Forward", c.payload);
      const int64_t rows = req.input().shape(0);
      const Shape row = RowShape(req.input());
      std::vector<char>& x = shard_batch_->x;  // reused, as a batch's
      ScatterRows(nullptr, rows, row.NumElements() * sizeof(float), &x);
      int64_t n = 0;
      const DataParallelShard shard = ShardOf(rows, &n);
      // A retained forward keeps a record of its own; the others reuse the replica's.
      std::unique_ptr<ForwardRecord> kept;
      if (req.retain_for_backward()) kept = std::make_unique<ForwardRecord>();
      ForwardRecord* rec = kept != nullptr ? kept.get() : &r->forward_record;
      const Status s = r->model->Forward(ViewOf(x, row, n), rec, shard);
      std::vector<std::string> unused;
      channel_->Gather(s.ok() ? Bytes(rec->output().data(), rec->output().size()) : std::string(),
                       &unused);
      if (req.layer_stats()) {
        channel_->Gather(
            s.ok() ? MomentsBytes(r->model->net().ActivationMoments(*rec)) : std::string(),
            &unused);
      }
      MustAgree(rank, "Forward", c.key, s);
      if (req.retain_for_backward()) {
        // Keep only what rank 0 still holds, then this one.
        for (auto it = r->retained.begin(); it != r->retained.end();) {
          it = std::find(c.ids.begin(), c.ids.end(), it->first) == c.ids.end()
                   ? r->retained.erase(it)
                   : std::next(it);
        }
        kept->RetainInput();
        r->retained[c.arg] = std::move(kept);
      }
      return;
    }
    case Op::kBackward: {
      Replica* r = Find(c.key, "Backward");
      const auto req = Parse<v1::BackwardRequest>(rank, "Backward", c.payload);
      auto it = r->retained.find(c.arg);
      if (it == r->retained.end()) {
        MustAgree(rank, "Backward", c.key,
                  FailedPrecondition("forward ", c.arg, " is not held on this rank"));
      }
      std::unique_ptr<ForwardRecord> rec = std::move(it->second);
      r->retained.erase(it);
      const Shape row = RowShape(req.grad_output());
      std::vector<char> grad;
      ScatterRows(nullptr, req.grad_output().shape(0), row.NumElements() * sizeof(float), &grad);
      Tensor grad_input;
      const Status s = r->model->Backward(rec.get(), ViewOf(grad, row, rec->batch_size()),
                                          req.return_grad_input() ? &grad_input : nullptr);
      std::vector<std::string> unused;
      channel_->Gather(s.ok() && req.return_grad_input()
                           ? Bytes(grad_input.data(), grad_input.size())
                           : std::string(),
                       &unused);
      // A stale forward is refused on every rank alike (the same history): not a disagreement.
      if (!s.ok() && s.code() != StatusCode::kFailedPrecondition) {
        MustAgree(rank, "Backward", c.key, s);
      }
      for (auto jt = r->retained.begin(); jt != r->retained.end();) {
        jt = std::find(c.ids.begin(), c.ids.end(), jt->first) == c.ids.end()
                 ? r->retained.erase(jt)
                 : std::next(jt);
      }
      return;
    }
    case Op::kApplyGradients: {
      Replica* r = Find(c.key, "ApplyGradients");
      StepResult result;
      const Status s = r->model->ApplyGradients(&result, &timed_);
      if (!s.ok() && s.code() != StatusCode::kFailedPrecondition) {
        MustAgree(rank, "ApplyGradients", c.key, s);
      }
      return;
    }
    case Op::kSetMode: {
      Replica* r = Find(c.key, "SetMode");
      const auto req = Parse<v1::SetModeRequest>(rank, "SetMode", c.payload);
      const bool freeze = req.has_freeze_running_stats() ? req.freeze_running_stats()
                                                          : r->model->running_stats_frozen();
      r->model->SetMode(req.mode() == v1::MODE_TRAIN, freeze);
      return;
    }
    case Op::kSetState: {
      Replica* r = Find(c.key, "SetState");
      const auto req = Parse<v1::SetStateRequest>(rank, "SetState", c.payload);
      std::vector<NamedTensor> entries;
      MustAgree(rank, "SetState", c.key, StateFromWire(req.state(), kNoLimit, &entries));
      MustAgree(rank, "SetState", c.key, r->model->SetState(entries, req.strict()));
      r->retained.clear();
      return;
    }
    case Op::kResetRunningStats: {
      Replica* r = Find(c.key, "ResetRunningStats");
      r->model->ResetRunningStats();
      r->retained.clear();
      return;
    }
    case Op::kUpdateOptimizer: {
      Replica* r = Find(c.key, "UpdateOptimizer");
      const auto req = Parse<v1::UpdateOptimizerRequest>(rank, "UpdateOptimizer", c.payload);
      OptimizerConfig config;
      MustAgree(rank, "UpdateOptimizer", c.key,
                OptimizerSpecToConfig(req.optimizer(), "optimizer", &config));
      MustAgree(rank, "UpdateOptimizer", c.key, r->model->UpdateOptimizer(config));
      return;
    }
    case Op::kSetLayerOptions: {
      Replica* r = Find(c.key, "SetLayerOptions");
      const auto req = Parse<v1::SetLayerOptionsRequest>(rank, "SetLayerOptions", c.payload);
      std::vector<LayerOptionsChange> changes;
      LayerOptionsFromWire(req.layers(), &changes);
      bool frozen_changed = false;
      MustAgree(rank, "SetLayerOptions", c.key,
                r->model->SetLayerOptions(changes, &frozen_changed));
      if (frozen_changed) r->retained.clear();
      return;
    }
    case Op::kSync: {
      Replica* r = Find(c.key, "AdaptStatistics");
      LoadedCheckpoint ckpt;
      MustAgree(rank, "AdaptStatistics", c.key, DecodeCheckpoint(c.payload, &ckpt));
      MustAgree(rank, "AdaptStatistics", c.key, r->model->SetState(ckpt.state, /*strict=*/true));
      r->retained.clear();
      return;
    }
    case Op::kDigest: {
      std::vector<std::string> unused;
      channel_->Gather(DigestAll(), &unused);
      return;
    }
  }
  MustAgree(rank, "command", c.key,
            InvalidArgument("unknown command ", static_cast<uint32_t>(c.op)));
}

std::string DataParallelJob::DigestAll() {
  Fnv f;
  int models = 0;
  for (const auto& [key, r] : replicas_) {
    DigestModel(key, *r->model, &f);
    ++models;
  }
  return DigestString(models, f.h);
}

}  // namespace normd::server
