#include "server/checkpoint.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <set>
#include <utility>

#include <spdlog/spdlog.h>

#include "server/checkpoint.pb.h"
#include "server/crc32c.h"

// The raw tensor encoding is little-endian float32, written and read with memcpy.
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "checkpoints assume a little-endian host");
static_assert(sizeof(float) == 4, "float32 expected");

namespace normd::server {
namespace {

namespace fs = std::filesystem;

#ifdef FUZZING_BUILD_MODE_UNSAFE_FOR_PRODUCTION
constexpr bool kVerifyChecksums = false;  // let a fuzzer reach the parsers behind the CRCs
#else
constexpr bool kVerifyChecksums = true;
#endif

constexpr char kMagic[8] = {'N', 'O', 'R', 'M', 'D', 'C', 'K', '1'};
constexpr size_t kPreambleBytes = 12;  // magic + version
constexpr size_t kFrameBytes = 16;     // type + length + crc

enum SectionType : uint32_t { kHeader = 1, kSpec = 2, kState = 3, kEnd = 4 };
constexpr SectionType kSectionOrder[] = {kHeader, kSpec, kState, kEnd};

const char* SectionName(uint32_t type) {
  switch (type) {
    case kHeader: return "header";
    case kSpec: return "spec";
    case kState: return "state";
    case kEnd: return "end";
  }
  return "unknown";
}

constexpr char kNamePrefix[] = "ckpt-";
constexpr char kNameSuffix[] = ".nckpt";
constexpr size_t kNameDigits = 20;
constexpr char kTempPrefix[] = ".tmp-";
constexpr char kDeletedPrefix[] = ".deleted-";
constexpr char kCorruptDir[] = "corrupt";

void PutU32(char* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<char>(v >> (8 * i));
}
void PutU64(char* p, uint64_t v) {
  for (int i = 0; i < 8; ++i) p[i] = static_cast<char>(v >> (8 * i));
}
uint32_t GetU32(const char* p) {
  uint32_t v = 0;
  for (int i = 0; i < 4; ++i) v |= static_cast<uint32_t>(static_cast<unsigned char>(p[i])) << (8 * i);
  return v;
}
uint64_t GetU64(const char* p) {
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v |= static_cast<uint64_t>(static_cast<unsigned char>(p[i])) << (8 * i);
  return v;
}

std::string Hex32(uint32_t v) {
  char buf[11];
  std::snprintf(buf, sizeof(buf), "0x%08x", v);
  return buf;
}

// Appends one framed section holding `msg`, serialised in place (no intermediate copy).
Status AppendSection(SectionType type, const google::protobuf::MessageLite& msg, std::string* out) {
  const size_t size = msg.ByteSizeLong();
  if (size > static_cast<size_t>(INT_MAX)) {
    return ResourceExhausted("checkpoint ", SectionName(type), " section is ", size,
                             " bytes, over protobuf's 2 GiB message limit");
  }
  const size_t start = out->size();
  out->resize(start + kFrameBytes + size);
  char* frame = &(*out)[start];
  PutU32(frame, type);
  PutU64(frame + 4, size);
  msg.SerializeWithCachedSizesToArray(reinterpret_cast<uint8_t*>(frame + kFrameBytes));
  uint32_t crc = Crc32c(frame, 12);
  crc = Crc32cExtend(crc, frame + kFrameBytes, size);
  PutU32(frame + 12, crc);
  return Status::Ok();
}

std::string CheckpointFileName(uint64_t step, uint64_t seq) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%s%020llu-%020llu%s", kNamePrefix,
                static_cast<unsigned long long>(step), static_cast<unsigned long long>(seq),
                kNameSuffix);
  return buf;
}

bool ParseDigits(std::string_view s, uint64_t* v) {
  uint64_t x = 0;
  for (char c : s) {
    if (c < '0' || c > '9') return false;
    const uint64_t d = static_cast<uint64_t>(c - '0');
    if (x > (UINT64_MAX - d) / 10) return false;
    x = x * 10 + d;
  }
  *v = x;
  return true;
}

// "ckpt-<20 digits>-<20 digits>.nckpt" -> step, seq.
bool ParseCheckpointFileName(std::string_view name, uint64_t* step, uint64_t* seq) {
  const size_t prefix = sizeof(kNamePrefix) - 1, suffix = sizeof(kNameSuffix) - 1;
  if (name.size() != prefix + kNameDigits + 1 + kNameDigits + suffix) return false;
  if (name.substr(0, prefix) != kNamePrefix) return false;
  if (name.substr(name.size() - suffix) != kNameSuffix) return false;
  if (name[prefix + kNameDigits] != '-') return false;
  return ParseDigits(name.substr(prefix, kNameDigits), step) &&
         ParseDigits(name.substr(prefix + kNameDigits + 1, kNameDigits), seq);
}

bool StartsWith(const std::string& s, const char* prefix) { return s.rfind(prefix, 0) == 0; }

Status IoError(const std::string& what, const std::string& path, int err) {
  const std::string msg = StrCat(what, " ", path, ": ", std::strerror(err));
  if (err == ENOSPC || err == EDQUOT) return ResourceExhausted(msg);
  return Status(StatusCode::kInternal, msg);
}

Status FsError(const std::string& what, const fs::path& path, const std::error_code& ec) {
  return Status(StatusCode::kInternal, StrCat(what, " ", path.string(), ": ", ec.message()));
}

Status FsyncDir(const fs::path& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return IoError("cannot open directory", dir.string(), errno);
  const int rc = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  if (rc != 0) return IoError("cannot fsync directory", dir.string(), err);
  return Status::Ok();
}

// Creates `dir` if needed; when it creates it, makes the new entry durable in its parent.
Status EnsureDir(const fs::path& dir) {
  std::error_code ec;
  if (fs::is_directory(dir, ec)) return Status::Ok();
  const fs::path parent = dir.parent_path();
  if (!parent.empty()) NORMD_RETURN_IF_ERROR(EnsureDir(parent));
  if (!fs::create_directory(dir, ec) && ec) {
    return FsError("cannot create directory", dir, ec);
  }
  if (!fs::is_directory(dir, ec)) {
    return Status(StatusCode::kInternal, StrCat(dir.string(), " exists and is not a directory"));
  }
  return FsyncDir(parent.empty() ? fs::path(".") : parent);
}

// Writes all of `bytes` to a new file at `path` and fsyncs it.
Status WriteFileDurably(const fs::path& path, const std::string& bytes) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd < 0) return IoError("cannot create", path.string(), errno);
  const char* p = bytes.data();
  size_t left = bytes.size();
  while (left > 0) {
    const ssize_t n = ::write(fd, p, left);
    if (n < 0) {
      if (errno == EINTR) continue;
      const int err = errno;
      ::close(fd);
      return IoError("cannot write", path.string(), err);
    }
    p += n;
    left -= static_cast<size_t>(n);
  }
  if (::fsync(fd) != 0) {
    const int err = errno;
    ::close(fd);
    return IoError("cannot fsync", path.string(), err);
  }
  if (::close(fd) != 0) return IoError("cannot close", path.string(), errno);
  return Status::Ok();
}

Status ReadWholeFile(const fs::path& path, std::string* out) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return IoError("cannot open", path.string(), errno);
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    return IoError("cannot stat", path.string(), err);
  }
  out->resize(static_cast<size_t>(st.st_size));
  size_t got = 0;
  while (got < out->size()) {
    const ssize_t n = ::read(fd, &(*out)[got], out->size() - got);
    if (n < 0) {
      if (errno == EINTR) continue;
      const int err = errno;
      ::close(fd);
      return IoError("cannot read", path.string(), err);
    }
    if (n == 0) break;  // shrank while reading
    got += static_cast<size_t>(n);
  }
  ::close(fd);
  out->resize(got);
  return Status::Ok();
}

struct CheckpointFile {
  fs::path path;
  uint64_t step = 0;
  uint64_t seq = 0;
};

// The model directory's checkpoint files, newest (largest seq) first; with `temps`, also the
// leftover temp files.
Status ListCheckpoints(const fs::path& dir, std::vector<CheckpointFile>* files,
                       std::vector<fs::path>* temps) {
  files->clear();
  std::error_code ec;
  fs::directory_iterator it(dir, ec);
  if (ec) return FsError("cannot list", dir, ec);
  for (; it != fs::directory_iterator(); it.increment(ec)) {
    const std::string name = it->path().filename().string();
    CheckpointFile f;
    if (ParseCheckpointFileName(name, &f.step, &f.seq)) {
      f.path = it->path();
      files->push_back(std::move(f));
    } else if (temps != nullptr && StartsWith(name, kTempPrefix)) {
      temps->push_back(it->path());
    }
  }
  if (ec) return FsError("cannot list", dir, ec);
  std::sort(files->begin(), files->end(), [](const CheckpointFile& a, const CheckpointFile& b) {
    return a.seq != b.seq ? a.seq > b.seq : a.step > b.step;
  });
  return Status::Ok();
}

// Moves a rejected file to <dir>/corrupt/, never overwriting an earlier one there.
Status MoveAside(const fs::path& file, std::string* moved_to) {
  const fs::path corrupt = file.parent_path() / kCorruptDir;
  NORMD_RETURN_IF_ERROR(EnsureDir(corrupt));
  fs::path target = corrupt / file.filename();
  std::error_code ec;
  for (int i = 1; fs::exists(target, ec); ++i) {
    target = corrupt / StrCat(file.filename().string(), ".", i);
  }
  if (::rename(file.c_str(), target.c_str()) != 0) {
    return IoError("cannot move aside", file.string(), errno);
  }
  NORMD_RETURN_IF_ERROR(FsyncDir(corrupt));
  NORMD_RETURN_IF_ERROR(FsyncDir(file.parent_path()));
  *moved_to = target.string();
  return Status::Ok();
}

Status DecodeHeader(const checkpoint::CheckpointHeader& h, LoadedCheckpoint* out) {
  if (h.model_id().empty()) return InvalidArgument("header: empty model id");
  if (h.mode() != v1::MODE_TRAIN && h.mode() != v1::MODE_EVAL) {
    return InvalidArgument("header: mode ", static_cast<int>(h.mode()),
                           " is neither MODE_TRAIN nor MODE_EVAL");
  }
  if (h.rng_state_size() != 4) {
    return InvalidArgument("header: rng state has ", h.rng_state_size(), " words, expected 4");
  }
  out->model_id = h.model_id();
  out->step = h.step();
  out->training = h.mode() == v1::MODE_TRAIN;
  out->running_stats_frozen = h.running_stats_frozen();
  for (int i = 0; i < 4; ++i) out->rng_state[i] = h.rng_state(i);
  out->created_unix_micros = h.created_unix_micros();
  out->layer_options.clear();
  for (const v1::LayerOptions& o : h.layer_options()) {
    if (o.layer().empty()) return InvalidArgument("header: a layer option without a layer");
    LayerOptionsChange c;
    c.layer = o.layer();
    if (o.has_frozen()) c.frozen = o.frozen();
    if (o.has_trainable()) c.trainable = o.trainable();
    out->layer_options.push_back(std::move(c));
  }
  out->inference_only = h.inference_only();
  if (out->inference_only && out->training) {
    return InvalidArgument("header: an inference-only model in train mode");
  }
  return Status::Ok();
}

Status DecodeState(const v1::ModelState& state, std::vector<NamedTensor>* out) {
  out->clear();
  out->reserve(state.tensors_size());
  std::set<std::string> names;
  for (int i = 0; i < state.tensors_size(); ++i) {
    const v1::NamedTensor& nt = state.tensors(i);
    if (nt.name().empty()) return InvalidArgument("state: entry ", i, " has no name");
    if (!names.insert(nt.name()).second) {
      return InvalidArgument("state: entry '", nt.name(), "' appears twice");
    }
    const v1::Tensor& t = nt.tensor();
    NamedTensor e;
    e.name = nt.name();
    const std::vector<int64_t> dims(t.shape().begin(), t.shape().end());
    if (!Shape::FromVector(dims, &e.shape)) {
      return InvalidArgument("state: entry '", nt.name(), "' has rank ", dims.size(),
                             ", over the maximum ", kMaxRank);
    }
    for (int64_t d : dims) {
      if (d < 0) return InvalidArgument("state: entry '", nt.name(), "' has a negative dimension");
    }
    if (t.values_size() != 0) {
      return InvalidArgument("state: entry '", nt.name(), "' uses the values encoding, not raw");
    }
    const int64_t n = e.shape.NumElements();
    if (n > static_cast<int64_t>(t.raw().size() / 4) ||
        t.raw().size() != static_cast<size_t>(n) * 4) {
      return InvalidArgument("state: entry '", nt.name(), "' of shape ", e.shape.ToString(),
                             " holds ", t.raw().size(), " raw bytes, expected ", n, " * 4");
    }
    e.values.resize(static_cast<size_t>(n));
    if (n > 0) std::memcpy(e.values.data(), t.raw().data(), t.raw().size());
    out->push_back(std::move(e));
  }
  return Status::Ok();
}

// Reads, decodes and checks one candidate. `corrupt` tells a content problem (set the file
// aside) from an I/O failure (leave it: it may read fine next time).
Status LoadCandidate(const CheckpointFile& f, const std::string& model_id, LoadedCheckpoint* out,
                     bool* corrupt) {
  std::string bytes;
  *corrupt = false;
  NORMD_RETURN_IF_ERROR(ReadWholeFile(f.path, &bytes));
  *corrupt = true;
  NORMD_RETURN_IF_ERROR(DecodeCheckpoint(bytes, out));
  if (out->step != f.step) {
    return InvalidArgument("header holds step ", out->step, " but the file name says ", f.step);
  }
  if (out->model_id != model_id) {
    return InvalidArgument("header names model '", out->model_id, "', not '", model_id, "'");
  }
  out->path = f.path.string();
  out->seq = f.seq;
  *corrupt = false;
  return Status::Ok();
}

}  // namespace

Status ValidateModelIdForDisk(const std::string& model_id) {
  if (model_id.empty() || model_id.size() > 128) {
    return InvalidArgument("model id must have 1 to 128 characters, got ", model_id.size());
  }
  // A leading '.' would hide the directory among the temp and removal entries (and allow "..").
  if (model_id[0] == '.') {
    return InvalidArgument("model id '", model_id, "' must not start with '.'");
  }
  for (char c : model_id) {
    const bool alnum = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9');
    if (!alnum && c != '.' && c != '_' && c != '-') {
      return InvalidArgument("model id '", model_id,
                             "' may only contain letters, digits, '.', '_' and '-'");
    }
  }
  return Status::Ok();
}

Status SnapshotCheckpoint(const std::string& model_id, const v1::ModelSpec& spec, Model& model,
                          CheckpointSnapshot* out) {
  NORMD_RETURN_IF_ERROR(ValidateModelIdForDisk(model_id));
  checkpoint::CheckpointHeader header;
  header.set_model_id(model_id);
  header.set_step(model.step());
  header.set_mode(model.training() ? v1::MODE_TRAIN : v1::MODE_EVAL);
  header.set_running_stats_frozen(model.running_stats_frozen());
  for (const LayerOptionsStatus& o : model.layer_options()) {
    if (!o.frozen && o.trainable) continue;
    v1::LayerOptions* w = header.add_layer_options();
    w->set_layer(o.name);
    w->set_frozen(o.frozen);
    w->set_trainable(o.trainable);
  }
  header.set_inference_only(model.inference_only());
  for (uint64_t w : model.rng().state()) header.add_rng_state(w);
  header.set_created_unix_micros(std::chrono::duration_cast<std::chrono::microseconds>(
                                     std::chrono::system_clock::now().time_since_epoch())
                                     .count());

  v1::ModelState state;
  for (NamedTensor& e : model.GetState(/*include_optimizer=*/true)) {
    v1::NamedTensor* nt = state.add_tensors();
    nt->set_name(std::move(e.name));
    v1::Tensor* t = nt->mutable_tensor();
    for (int64_t d : e.shape) t->add_shape(d);
    t->set_raw(reinterpret_cast<const char*>(e.values.data()), e.values.size() * sizeof(float));
  }

  out->model_id = model_id;
  out->step = model.step();
  out->bytes.clear();
  out->bytes.append(kMagic, sizeof(kMagic));
  out->bytes.resize(kPreambleBytes);
  PutU32(&out->bytes[8], kCheckpointFormatVersion);
  NORMD_RETURN_IF_ERROR(AppendSection(kHeader, header, &out->bytes));
  NORMD_RETURN_IF_ERROR(AppendSection(kSpec, spec, &out->bytes));
  NORMD_RETURN_IF_ERROR(AppendSection(kState, state, &out->bytes));
  checkpoint::CheckpointTrailer trailer;
  trailer.set_section_count(3);
  trailer.set_body_bytes(out->bytes.size());
  trailer.set_body_crc32c(Crc32c(out->bytes.data(), out->bytes.size()));
  return AppendSection(kEnd, trailer, &out->bytes);
}

Status WriteCheckpoint(const std::string& data_dir, const CheckpointSnapshot& snapshot,
                       int keep_last, SaveInfo* info) {
  NORMD_RETURN_IF_ERROR(ValidateModelIdForDisk(snapshot.model_id));
  if (keep_last < 1) return InvalidArgument("keep_last must be at least 1, got ", keep_last);
  const fs::path dir = fs::path(data_dir) / snapshot.model_id;
  NORMD_RETURN_IF_ERROR(EnsureDir(dir));

  std::vector<CheckpointFile> existing;
  NORMD_RETURN_IF_ERROR(ListCheckpoints(dir, &existing, nullptr));
  const uint64_t seq = existing.empty() ? 1 : existing.front().seq + 1;
  const std::string name = CheckpointFileName(snapshot.step, seq);
  const fs::path final_path = dir / name;

  // Unique even across a restart that reuses the pid (pid 1 in a container).
  static std::atomic<uint64_t> counter{0};
  const uint64_t nonce = static_cast<uint64_t>(
      std::chrono::steady_clock::now().time_since_epoch().count());
  const fs::path temp_path =
      dir / StrCat(kTempPrefix, name, ".", ::getpid(), ".", nonce, ".", counter++);

  Status st = WriteFileDurably(temp_path, snapshot.bytes);
  if (st.ok() && ::rename(temp_path.c_str(), final_path.c_str()) != 0) {
    st = IoError("cannot rename to", final_path.string(), errno);
  }
  if (!st.ok()) {
    ::unlink(temp_path.c_str());
    return st;
  }
  // The checkpoint is complete once its directory entry is durable.
  NORMD_RETURN_IF_ERROR(FsyncDir(dir));

  if (info != nullptr) {
    info->path = final_path.string();
    info->step = snapshot.step;
    info->seq = seq;
    info->bytes = snapshot.bytes.size();
    info->removed.clear();
  }
  // Rotation: the new file plus the keep_last - 1 newest older ones stay. A failure here
  // costs disk space, not data, so it is logged rather than returned.
  for (size_t i = static_cast<size_t>(keep_last) - 1; i < existing.size(); ++i) {
    std::error_code ec;
    if (fs::remove(existing[i].path, ec)) {
      if (info != nullptr) info->removed.push_back(existing[i].path.string());
    } else if (ec) {
      spdlog::warn("checkpoint rotation: cannot remove {}: {}", existing[i].path.string(),
                   ec.message());
    }
  }
  return Status::Ok();
}

Status SaveCheckpoint(const std::string& data_dir, const std::string& model_id,
                      const v1::ModelSpec& spec, Model& model, int keep_last, SaveInfo* info) {
  CheckpointSnapshot snapshot;
  NORMD_RETURN_IF_ERROR(SnapshotCheckpoint(model_id, spec, model, &snapshot));
  return WriteCheckpoint(data_dir, snapshot, keep_last, info);
}

Status DecodeCheckpoint(std::string_view bytes, LoadedCheckpoint* out) {
  if (bytes.size() < kPreambleBytes) {
    return InvalidArgument("file is ", bytes.size(), " bytes, shorter than the ", kPreambleBytes,
                           "-byte magic and version");
  }
  if (std::memcmp(bytes.data(), kMagic, sizeof(kMagic)) != 0) {
    return InvalidArgument("bad magic: not a normd checkpoint");
  }
  const uint32_t version = GetU32(bytes.data() + 8);
  if (version != kCheckpointFormatVersion) {
    return InvalidArgument("unsupported format version ", version, " (this build reads version ",
                           kCheckpointFormatVersion, ")");
  }
  size_t pos = kPreambleBytes;
  for (SectionType expected : kSectionOrder) {
    const char* name = SectionName(expected);
    const size_t left = bytes.size() - pos;
    if (left < kFrameBytes) {
      return InvalidArgument("truncated: the ", name, " section at offset ", pos,
                             " needs a 16-byte frame but ", left, " bytes remain");
    }
    const char* frame = bytes.data() + pos;
    const uint32_t type = GetU32(frame);
    const uint64_t length = GetU64(frame + 4);
    const uint32_t stored_crc = GetU32(frame + 12);
    if (type != expected) {
      return InvalidArgument("section at offset ", pos, " has type ", type, " (",
                             SectionName(type), "), expected ", expected, " (", name, ")");
    }
    if (length > left - kFrameBytes) {
      return InvalidArgument("truncated: the ", name, " section at offset ", pos, " declares ",
                             length, " bytes but ", left - kFrameBytes, " remain");
    }
    if (length > static_cast<uint64_t>(INT_MAX)) {
      return InvalidArgument("the ", name, " section at offset ", pos, " is ", length,
                             " bytes, over the 2 GiB limit");
    }
    const char* payload = frame + kFrameBytes;
    const int size = static_cast<int>(length);
    const uint32_t crc = Crc32cExtend(Crc32c(frame, 12), payload, length);
    if (kVerifyChecksums && crc != stored_crc) {
      return InvalidArgument("the ", name, " section at offset ", pos, " fails its CRC-32C (stored ",
                             Hex32(stored_crc), ", computed ", Hex32(crc), ")");
    }
    switch (expected) {
      case kHeader: {
        checkpoint::CheckpointHeader header;
        if (!header.ParseFromArray(payload, size)) {
          return InvalidArgument("the header section does not parse");
        }
        NORMD_RETURN_IF_ERROR(DecodeHeader(header, out));
        break;
      }
      case kSpec:
        if (!out->spec.ParseFromArray(payload, size)) {
          return InvalidArgument("the spec section does not parse");
        }
        break;
      case kState: {
        v1::ModelState state;
        if (!state.ParseFromArray(payload, size)) {
          return InvalidArgument("the state section does not parse");
        }
        NORMD_RETURN_IF_ERROR(DecodeState(state, &out->state));
        break;
      }
      case kEnd: {
        checkpoint::CheckpointTrailer trailer;
        if (!trailer.ParseFromArray(payload, size)) {
          return InvalidArgument("the end section does not parse");
        }
        const uint32_t body_crc = Crc32c(bytes.data(), pos);
        if (trailer.section_count() != 3 || trailer.body_bytes() != pos ||
            (kVerifyChecksums && trailer.body_crc32c() != body_crc)) {
          return InvalidArgument("the end section does not match the file: it records ",
                                 trailer.section_count(), " sections in ", trailer.body_bytes(),
                                 " bytes with CRC-32C ", Hex32(trailer.body_crc32c()),
                                 "; the file has 3 in ", pos, " with ", Hex32(body_crc));
        }
        break;
      }
    }
    pos += kFrameBytes + length;
  }
  if (pos != bytes.size()) {
    return InvalidArgument(bytes.size() - pos, " unexpected bytes after the end section");
  }
  out->path.clear();
  out->seq = 0;
  return Status::Ok();
}

Status ReadCheckpointFile(const std::string& path, LoadedCheckpoint* out) {
  CheckpointFile f;
  f.path = path;
  if (!ParseCheckpointFileName(f.path.filename().string(), &f.step, &f.seq)) {
    return InvalidArgument(path, ": not a checkpoint file name (ckpt-<step>-<seq>.nckpt)");
  }
  std::string bytes;
  NORMD_RETURN_IF_ERROR(ReadWholeFile(f.path, &bytes));
  NORMD_RETURN_IF_ERROR(DecodeCheckpoint(bytes, out).WithPrefix(path));
  if (out->step != f.step) {
    return InvalidArgument(path, ": header holds step ", out->step, " but the file name says ",
                           f.step);
  }
  out->path = path;
  out->seq = f.seq;
  return Status::Ok();
}

Status LoadLatestCheckpoint(const std::string& data_dir, const std::string& model_id,
                            LoadedCheckpoint* out, const CheckpointAcceptFn& accept,
                            LoadReport* report) {
  NORMD_RETURN_IF_ERROR(ValidateModelIdForDisk(model_id));
  LoadReport local_report;
  if (report == nullptr) report = &local_report;
  *report = LoadReport();
  const fs::path dir = fs::path(data_dir) / model_id;
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) {
    return NotFound("model '", model_id, "' has no checkpoint directory in ", data_dir);
  }
  std::vector<CheckpointFile> files;
  std::vector<fs::path> temps;
  NORMD_RETURN_IF_ERROR(ListCheckpoints(dir, &files, &temps));
  for (const fs::path& t : temps) {
    // A save that never reached its rename was never acknowledged: drop it.
    if (fs::remove(t, ec)) {
      ++report->temp_files_removed;
      spdlog::info("checkpoint: removed unfinished temp file {}", t.string());
    } else if (ec) {
      spdlog::warn("checkpoint: cannot remove temp file {}: {}", t.string(), ec.message());
    }
  }
  if (files.empty()) {
    return NotFound("model '", model_id, "' has no checkpoint in ", dir.string());
  }
  std::string reasons;
  for (const CheckpointFile& f : files) {
    LoadedCheckpoint candidate;
    bool corrupt = false;
    Status st = LoadCandidate(f, model_id, &candidate, &corrupt);
    if (st.ok() && accept) {
      st = accept(candidate);
      if (!st.ok()) {
        spdlog::warn("checkpoint {}: intact but not usable, trying an older one: {}",
                     f.path.string(), st.message());
        report->skipped.push_back(StrCat(f.path.filename().string(), ": ", st.message()));
        reasons += StrCat("; ", f.path.filename().string(), ": ", st.message());
        continue;
      }
    }
    if (st.ok()) {
      *out = std::move(candidate);
      if (!report->rejected.empty() || !report->skipped.empty()) {
        spdlog::warn("model '{}': restored from older checkpoint {} (step {})", model_id,
                     out->path, out->step);
      }
      return Status::Ok();
    }
    const std::string reason = StrCat(f.path.filename().string(), ": ", st.message());
    reasons += "; " + reason;
    report->rejected.push_back(reason);
    if (corrupt) {
      std::string moved_to;
      const Status mv = MoveAside(f.path, &moved_to);
      if (mv.ok()) {
        report->moved_aside.push_back(moved_to);
        spdlog::error("checkpoint {} rejected: {}; moved to {}", f.path.string(), st.message(),
                      moved_to);
      } else {
        spdlog::error("checkpoint {} rejected: {}; could not move it aside: {}",
                      f.path.string(), st.message(), mv.message());
      }
    } else {
      spdlog::error("checkpoint {} unreadable: {}", f.path.string(), st.message());
    }
  }
  return FailedPrecondition("model '", model_id, "': none of its ", files.size(),
                            " checkpoints is usable", reasons);
}

Status ScanTenantDirs(const std::string& data_dir, std::vector<std::string>* tenants) {
  tenants->clear();
  const fs::path root(data_dir);
  std::error_code ec;
  if (!fs::exists(root, ec)) return Status::Ok();
  fs::directory_iterator it(root, ec);
  if (ec) return FsError("cannot list", root, ec);
  for (; it != fs::directory_iterator(); it.increment(ec)) {
    const std::string name = it->path().filename().string();
    std::error_code type_ec;
    if (!it->is_directory(type_ec) || !StartsWith(name, kTenantDirPrefix)) continue;
    const std::string tenant = name.substr(std::strlen(kTenantDirPrefix));
    if (!tenant.empty()) tenants->push_back(tenant);  // the registry validates the name
  }
  if (ec) return FsError("cannot list", root, ec);
  std::sort(tenants->begin(), tenants->end());
  return Status::Ok();
}

Status ScanDataDir(const std::string& data_dir, std::vector<std::string>* model_ids) {
  model_ids->clear();
  const fs::path root(data_dir);
  std::error_code ec;
  if (!fs::exists(root, ec)) return Status::Ok();
  if (!fs::is_directory(root, ec)) {
    return InvalidArgument("data directory ", data_dir, " is not a directory");
  }
  fs::directory_iterator it(root, ec);
  if (ec) return FsError("cannot list", root, ec);
  for (; it != fs::directory_iterator(); it.increment(ec)) {
    const std::string name = it->path().filename().string();
    std::error_code type_ec;
    if (!it->is_directory(type_ec)) continue;
    if (StartsWith(name, kDeletedPrefix)) {
      std::error_code rm_ec;
      fs::remove_all(it->path(), rm_ec);
      if (rm_ec) {
        spdlog::warn("cannot finish removing {}: {}", it->path().string(), rm_ec.message());
      } else {
        spdlog::info("finished an interrupted model removal: {}", it->path().string());
      }
      continue;
    }
    if (!ValidateModelIdForDisk(name).ok()) continue;
    std::vector<CheckpointFile> files;
    if (ListCheckpoints(it->path(), &files, nullptr).ok() && !files.empty()) {
      model_ids->push_back(name);
    }
  }
  if (ec) return FsError("cannot list", root, ec);
  std::sort(model_ids->begin(), model_ids->end());
  return Status::Ok();
}

Status RemoveModelFiles(const std::string& data_dir, const std::string& model_id) {
  NORMD_RETURN_IF_ERROR(ValidateModelIdForDisk(model_id));
  const fs::path root(data_dir);
  const fs::path dir = root / model_id;
  std::error_code ec;
  if (!fs::exists(dir, ec)) return Status::Ok();
  static std::atomic<uint64_t> counter{0};
  const fs::path doomed =
      root / StrCat(kDeletedPrefix, model_id, ".", ::getpid(), ".",
                    std::chrono::steady_clock::now().time_since_epoch().count(), ".", counter++);
  if (::rename(dir.c_str(), doomed.c_str()) != 0) {
    return IoError("cannot remove model directory", dir.string(), errno);
  }
  NORMD_RETURN_IF_ERROR(FsyncDir(root));
  fs::remove_all(doomed, ec);
  if (ec) {
    // The model is gone from the namespace already; ScanDataDir finishes the job later.
    spdlog::warn("cannot delete {}: {}", doomed.string(), ec.message());
  }
  return Status::Ok();
}

Status RestoreInto(const LoadedCheckpoint& ckpt, Model* model) {
  std::set<std::string> have;
  for (const NamedTensor& e : ckpt.state) have.insert(e.name);
  for (const NamedTensor& e : model->GetState(/*include_optimizer=*/true)) {
    if (have.count(e.name) == 0) {
      return InvalidArgument("checkpoint ", ckpt.path, " lacks state entry '", e.name,
                             "' of the model built from its spec");
    }
  }
  // Layer options first (validated, all or nothing), undone if the state is refused.
  std::vector<LayerOptionsChange> before;
  for (const LayerOptionsStatus& o : model->layer_options()) {
    before.push_back(LayerOptionsChange{o.name, o.frozen, o.trainable});
  }
  bool frozen_changed = false;
  NORMD_RETURN_IF_ERROR(model->SetLayerOptions(ckpt.layer_options, &frozen_changed)
                            .WithPrefix(StrCat("checkpoint ", ckpt.path)));
  Status s = model->SetState(ckpt.state, /*strict=*/true);
  if (!s.ok()) {
    model->SetLayerOptions(before, &frozen_changed);
    return s.WithPrefix(StrCat("checkpoint ", ckpt.path));
  }
  model->SetMode(ckpt.training, ckpt.running_stats_frozen);
  if (ckpt.inference_only) model->set_inference_only();
  model->set_step(ckpt.step);
  model->rng().set_state(ckpt.rng_state);
  return Status::Ok();
}

}  // namespace normd::server
