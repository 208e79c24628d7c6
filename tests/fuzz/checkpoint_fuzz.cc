// Fuzz target: the checkpoint loader on arbitrary bytes, as the server restores a model.
//
// Each input is decoded twice by the shipped decoder (server/checkpoint.h DecodeCheckpoint):
// as given, which exercises the framing and CRC checks, and re-framed, with every section CRC
// and the end section's body CRC recomputed, so mutated payloads get past the checksums to the
// section parsers and validators behind them. A decoded checkpoint then goes the way
// CheckpointPersistence restores one: its spec through SpecToConfig and Model::Create under
// small limits, then RestoreInto.
//
// Invariants (abort on violation): every rejection says why; what decodes is consistent (a
// model id, tensors with as many values as their shape); RestoreInto either fails leaving the
// fresh model untouched, or the model then holds exactly the checkpoint's entries, step and
// mode; a restored model snapshots into a checkpoint that decodes to the same state.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <string_view>

#include "core/model.h"
#include "server/checkpoint.h"
#include "server/checkpoint.pb.h"
#include "server/convert.h"
#include "server/crc32c.h"
#include "tests/fuzz/fuzz_util.h"

namespace normd::fuzz {
namespace {

constexpr size_t kPreambleBytes = 12;  // magic + version (server/checkpoint.h)
constexpr size_t kFrameBytes = 16;     // type u32 | length u64 | crc u32
constexpr uint32_t kEndSection = 4;

uint32_t GetU32(const char* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}
uint64_t GetU64(const char* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}

// Recomputes the CRCs of the well-framed sections of `in`, and the body CRC of an end section
// that parses. False when nothing would change.
bool Reframe(std::string_view in, std::string* out) {
  if (in.size() < kPreambleBytes) return false;
  *out = std::string(in.substr(0, kPreambleBytes));
  size_t pos = kPreambleBytes;
  while (in.size() - pos >= kFrameBytes) {
    const uint32_t type = GetU32(in.data() + pos);
    const uint64_t length = GetU64(in.data() + pos + 4);
    if (length > in.size() - pos - kFrameBytes) break;
    std::string payload(in.substr(pos + kFrameBytes, length));
    if (type == kEndSection) {
      checkpoint::CheckpointTrailer trailer;
      if (trailer.ParseFromString(payload)) {
        trailer.set_body_crc32c(server::Crc32c(out->data(), out->size()));
        payload = trailer.SerializeAsString();
      }
    }
    char frame[kFrameBytes];
    const uint64_t new_length = payload.size();
    std::memcpy(frame, &type, 4);
    std::memcpy(frame + 4, &new_length, 8);
    const uint32_t crc =
        server::Crc32cExtend(server::Crc32c(frame, 12), payload.data(), payload.size());
    std::memcpy(frame + 12, &crc, 4);
    out->append(frame, kFrameBytes);
    out->append(payload);
    pos += kFrameBytes + length;
  }
  out->append(in.substr(pos));
  return *out != in;
}

Sequential::Limits SmallLimits() {
  Sequential::Limits l;
  l.max_parameters = int64_t{1} << 16;
  l.max_layers = 32;
  l.max_sample_elements = int64_t{1} << 15;
  return l;
}

// A restored entry equals the checkpoint's bit for bit, but for counters (optimizer steps,
// num_batches_tracked, the schedule's last_epoch), which the model holds as integers: a
// checkpoint's -0 (a non-negative integer) comes back as 0.
bool SameEntry(const NamedTensor& restored, const NamedTensor& given) {
  if (SameState({restored}, {given})) return true;
  const std::string& n = restored.name;
  auto ends_with = [&n](const std::string& tail) {
    return n.size() >= tail.size() && n.compare(n.size() - tail.size(), tail.size(), tail) == 0;
  };
  const bool counter = ends_with(".step") || ends_with("num_batches_tracked") ||
                       n == "lr_scheduler.last_epoch";
  if (!counter || restored.shape != given.shape || restored.values.size() != given.values.size()) {
    return false;
  }
  for (size_t i = 0; i < restored.values.size(); ++i) {
    if (restored.values[i] != given.values[i]) return false;
  }
  return true;
}

void Restore(const server::LoadedCheckpoint& ckpt) {
  // The server only loads a file whose header names the model of its directory, a valid id
  // (LoadLatestCheckpoint), so the decoder itself leaves the id's characters alone.
  if (!server::ValidateModelIdForDisk(ckpt.model_id).ok()) return;
  ModelConfig config;
  if (!server::SpecToConfig(ckpt.spec, &config).ok()) return;
  std::unique_ptr<Model> model;
  if (!Model::Create(config, SmallLimits(), &model).ok()) return;
  const std::vector<NamedTensor> fresh = model->GetState(true);
  const Status s = server::RestoreInto(ckpt, model.get());
  if (!s.ok()) {
    NORMD_FUZZ_CHECK(!s.message().empty(), "RestoreInto failed without a message");
    NORMD_FUZZ_CHECK(
        SameState(fresh, model->GetState(true)) && model->step() == 0 && model->training(),
        "a failed RestoreInto changed the model (%s)", s.message().c_str());
    return;
  }
  const std::vector<NamedTensor> state = model->GetState(true);
  for (const NamedTensor& t : state) {
    const NamedTensor* given = nullptr;
    for (const NamedTensor& e : ckpt.state) {
      if (e.name == t.name) given = &e;
    }
    NORMD_FUZZ_CHECK(given != nullptr && SameEntry(t, *given),
                     "restored entry %s differs from the checkpoint", t.name.c_str());
  }
  NORMD_FUZZ_CHECK(model->step() == ckpt.step && model->training() == ckpt.training &&
                       model->running_stats_frozen() == ckpt.running_stats_frozen,
                   "restored step or mode differ from the checkpoint");
  // Saving the restored model gives a checkpoint that loads back to the same state.
  server::CheckpointSnapshot snap;
  const Status saved = server::SnapshotCheckpoint(ckpt.model_id, ckpt.spec, *model, &snap);
  NORMD_FUZZ_CHECK(saved.ok(), "snapshot of a restored model failed: %s", saved.message().c_str());
  server::LoadedCheckpoint again;
  const Status d = server::DecodeCheckpoint(snap.bytes, &again);
  NORMD_FUZZ_CHECK(d.ok(), "a restored model's checkpoint does not decode: %s",
                   d.message().c_str());
  NORMD_FUZZ_CHECK(again.step == ckpt.step && again.model_id == ckpt.model_id,
                   "re-saved header differs");
  std::unique_ptr<Model> second;
  NORMD_FUZZ_CHECK(Model::Create(config, SmallLimits(), &second).ok() &&
                       server::RestoreInto(again, second.get()).ok() &&
                       SameState(state, second->GetState(true)),
                   "re-saved checkpoint restores to another state");
}

void Decode(std::string_view bytes) {
  server::LoadedCheckpoint out;
  const Status st = server::DecodeCheckpoint(bytes, &out);
  if (!st.ok()) {
    NORMD_FUZZ_CHECK(!st.message().empty(), "a rejection without a message");
    return;
  }
  NORMD_FUZZ_CHECK(!out.model_id.empty(), "a checkpoint without a model id decoded");
  for (const NamedTensor& e : out.state) {
    NORMD_FUZZ_CHECK(static_cast<int64_t>(e.values.size()) == e.shape.NumElements(),
                     "entry %s has %zu values for shape %s", e.name.c_str(), e.values.size(),
                     e.shape.ToString().c_str());
  }
  Restore(out);
}

}  // namespace
}  // namespace normd::fuzz

extern "C" int LLVMFuzzerInitialize(int* /*argc*/, char*** /*argv*/) {
  google::protobuf::SetLogHandler(nullptr);  // parse failures are expected, not news
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view bytes(reinterpret_cast<const char*>(data), size);
  normd::fuzz::Decode(bytes);
  std::string reframed;
  if (normd::fuzz::Reframe(bytes, &reframed)) normd::fuzz::Decode(reframed);
  return 0;
}
