#include "server/flags.h"

#include <sched.h>
#include <sys/stat.h>
#include <unistd.h>

extern char** environ;

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cmath>
#include <iostream>
#include <set>
#include <sstream>
#include <thread>

namespace normd::server {
namespace {

constexpr int64_t kMinMessageBytes = 4096;
constexpr int64_t kMaxMessageBytes = (int64_t{1} << 31) - 1;  // gRPC counts bytes in an int
constexpr int kMaxComputeThreads = 1024;

// "HOST:PORT" (HOST may be "[v6]"), or a "unix:" / "unix-abstract:" path, which gRPC accepts.
Status CheckAddress(const std::string& value, const std::string& flag, bool allow_unix) {
  if (allow_unix && (value.rfind("unix:", 0) == 0 || value.rfind("unix-abstract:", 0) == 0)) {
    return Status::Ok();
  }
  const size_t colon = value.rfind(':');
  if (colon == std::string::npos || colon == 0 || colon + 1 == value.size()) {
    return InvalidArgument(flag, " must be HOST:PORT (e.g. 127.0.0.1:50051), got '", value, "'");
  }
  const std::string host = value.substr(0, colon);
  if (host.front() == '[' ? host.back() != ']' : host.find(':') != std::string::npos) {
    return InvalidArgument(flag, ": an IPv6 host must be bracketed ([::1]:50051), got '", value,
                           "'");
  }
  const std::string port = value.substr(colon + 1);
  if (port.size() > 5 || port.find_first_not_of("0123456789") != std::string::npos ||
      std::stoi(port) > 65535) {
    return InvalidArgument(flag, ": port must be a number from 0 to 65535, got '", port, "'");
  }
  return Status::Ok();
}

constexpr int kMaxConcurrentStreams = 1 << 20;
constexpr int kMinMetadataBytes = 1024;
constexpr int kMaxMetadataBytes = 1 << 20;
// gRPC takes durations as int milliseconds: a little under 24 days.
constexpr double kMaxDurationSeconds = 2'000'000;

// A duration flag: from `min` to kMaxDurationSeconds seconds.
Status CheckSeconds(double value, const char* flag, double min) {
  if (value >= min && value <= kMaxDurationSeconds) return Status::Ok();  // false for NaN
  return InvalidArgument(flag, " must be in [", min, ", ", static_cast<int64_t>(kMaxDurationSeconds),
                         "] seconds, got ", value);
}

// The per-tenant quotas, each 0 flag resolved to the global figure it defaults to: the whole
// server's models, the parameters the server could hold, the requests its models could queue.
void TenantQuotas(const Flags& f, RegistryLimits* l) {
  l->tenant_max_models = f.tenant_max_models > 0 ? f.tenant_max_models : f.max_models;
  l->tenant_max_parameters = f.tenant_max_parameters > 0
                                 ? f.tenant_max_parameters
                                 : SaturatingMul(f.max_models, f.max_parameters);
  l->tenant_max_queued =
      f.tenant_max_queued > 0
          ? f.tenant_max_queued
          : static_cast<int>(std::min<int64_t>(
                SaturatingMul(f.max_models, f.max_queued_per_model), 1 << 30));
}

}  // namespace

std::chrono::milliseconds Millis(double seconds) {
  return std::chrono::milliseconds(static_cast<int64_t>(std::llround(seconds * 1000.0)));
}

int ParseFlags(int argc, char** argv, Flags* f) {
  CLI::App app(
      "normd: a gRPC training service for BatchNorm networks.\n"
      "Every flag falls back to the environment variable NORMD_<FLAG> (e.g. NORMD_MAX_MODELS "
      "for --max-models) when not given.",
      "normd");
  app.set_version_flag("--version", Version());
  app.add_option("--listen", f->listen,
                 "gRPC address HOST:PORT (port 0 picks a free one; see --port-file)")
      ->envname("NORMD_LISTEN")->capture_default_str()->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
  app.add_option("--metrics", f->metrics,
                 "Prometheus endpoint HOST:PORT serving /metrics (empty: disabled)")
      ->envname("NORMD_METRICS")->capture_default_str()->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
  app.add_option("--data-dir", f->data_dir, "Directory where models persist")
      ->envname("NORMD_DATA_DIR")->capture_default_str()->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
  app.add_option("--max-models", f->max_models, "Most models held at once")
      ->envname("NORMD_MAX_MODELS")->capture_default_str()->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
  app.add_option("--max-message-bytes", f->max_message_bytes,
                 "Largest gRPC message received or sent, in bytes")
      ->envname("NORMD_MAX_MESSAGE_BYTES")->capture_default_str()->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
  app.add_option("--max-batch-elements", f->max_batch_elements,
                 "Largest tensor of one request: input, target or gradient elements, and "
                 "batch size x the model's largest per-sample activation")
      ->envname("NORMD_MAX_BATCH_ELEMENTS")->capture_default_str()->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
  app.add_option("--max-parameters", f->max_parameters, "Most parameters (floats) per model")
      ->envname("NORMD_MAX_PARAMETERS")->capture_default_str()->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
  app.add_option("--max-layers", f->max_layers, "Most layers per model")
      ->envname("NORMD_MAX_LAYERS")->capture_default_str()->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
  app.add_option("--max-retained-forwards", f->max_retained_forwards,
                 "Most forwards per model kept for Backward (retain_for_backward)")
      ->envname("NORMD_MAX_RETAINED_FORWARDS")->capture_default_str()->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
  app.add_option("--retained-forward-timeout", f->retained_forward_timeout,
                 "Seconds a retained forward waits for its Backward before it is dropped")
      ->envname("NORMD_RETAINED_FORWARD_TIMEOUT")->capture_default_str()->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
  app.add_option("--small-batch-threshold", f->small_batch_threshold,
                 "Warn (response and normd_bn_small_batch_total) when a BatchNorm layer "
                 "normalises a training batch over fewer values per channel than this; 0: never")
      ->envname("NORMD_SMALL_BATCH_THRESHOLD")->capture_default_str()->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
  app.add_option("--max-queued-per-model", f->max_queued_per_model,
                 "Requests waiting or running per model; more are refused with "
                 "RESOURCE_EXHAUSTED")
      ->envname("NORMD_MAX_QUEUED_PER_MODEL")->capture_default_str()->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
  app.add_option("--tenant-max-models", f->tenant_max_models,
                 "Most models one tenant holds at once (0: --max-models)")
      ->envname("NORMD_TENANT_MAX_MODELS")->capture_default_str()->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
  app.add_option("--tenant-max-parameters", f->tenant_max_parameters,
                 "Most parameters (floats) of all one tenant's models together (0: --max-models "
                 "x --max-parameters)")
      ->envname("NORMD_TENANT_MAX_PARAMETERS")->capture_default_str()->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
  app.add_option("--tenant-max-queued", f->tenant_max_queued,
                 "Requests waiting or running on one tenant's models together; more are refused "
                 "with RESOURCE_EXHAUSTED (0: --max-models x --max-queued-per-model)")
      ->envname("NORMD_TENANT_MAX_QUEUED")->capture_default_str()->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
  app.add_option("--compute-threads", f->compute_threads,
                 "Requests computed at once (0: one per available core); with fewer than the "
                 "cores, each request's matrix products share the rest")
      ->envname("NORMD_COMPUTE_THREADS")->capture_default_str()->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
  app.add_option("--log-level", f->log_level,
                 "trace, debug, info, warn, error, critical or off")
      ->envname("NORMD_LOG_LEVEL")->capture_default_str()->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
  app.add_option("--drain-timeout", f->drain_timeout,
                 "Seconds to let in-flight RPCs finish on SIGTERM/SIGINT before cancelling them")
      ->envname("NORMD_DRAIN_TIMEOUT")->capture_default_str()->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
  app.add_option("--job-stall-timeout", f->job_stall_timeout,
                 "Data-parallel jobs: seconds one operation may wait for the other ranks before "
                 "rank 0 ends the job (exit 4) so that its launcher can restart it; 0: wait "
                 "forever")
      ->envname("NORMD_JOB_STALL_TIMEOUT")->capture_default_str()->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
  app.add_option("--port-file", f->port_file,
                 "Once serving, write 'grpc=PORT' and 'metrics=PORT' lines to this file")
      ->envname("NORMD_PORT_FILE")->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
  app.add_flag("--in-memory", f->in_memory,
               "Keep models in memory only: no checkpoints, nothing restored at start, SaveModel "
               "answers FAILED_PRECONDITION")
      ->envname("NORMD_IN_MEMORY");
  app.add_option("--keep-checkpoints", f->keep_checkpoints,
                 "Checkpoints kept per model in --data-dir (the newest ones)")
      ->envname("NORMD_KEEP_CHECKPOINTS")->capture_default_str()
      ->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
  app.add_option("--autosave-steps", f->autosave_steps,
                 "Save a model after this many optimizer steps since its last save (0: off)")
      ->envname("NORMD_AUTOSAVE_STEPS")->capture_default_str()
      ->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
  app.add_option("--autosave-seconds", f->autosave_seconds,
                 "Save a model whose oldest unsaved change is this many seconds old (0: off)")
      ->envname("NORMD_AUTOSAVE_SECONDS")->capture_default_str()
      ->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
  app.add_option("--tls-cert", f->security.tls_cert,
                 "PEM certificate chain: serve gRPC over TLS (needs --tls-key; empty: plaintext)")
      ->envname("NORMD_TLS_CERT")->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
  app.add_option("--tls-key", f->security.tls_key,
                 "PEM private key of --tls-cert (unencrypted; keep it readable by normd only)")
      ->envname("NORMD_TLS_KEY")->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
  app.add_option("--tls-client-ca", f->security.tls_client_ca,
                 "PEM CA certificates: mutual TLS, every client must present a certificate they "
                 "signed (needs --tls-cert)")
      ->envname("NORMD_TLS_CLIENT_CA")->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
  app.add_option("--auth-token-file", f->security.auth_token_file,
                 "File of accepted bearer tokens, one 'TOKEN [TENANT [admin]]' per line (a bare "
                 "token: tenant 'default', admin): every call but health needs metadata "
                 "'authorization: Bearer <token>'; turns reflection off")
      ->envname("NORMD_AUTH_TOKEN_FILE")->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
  app.add_option("--tls-client-tenants", f->security.tls_client_tenants,
                 "File mapping client certificates to tenants, one 'CN=<name> TENANT [admin]' or "
                 "'SAN=<name> TENANT [admin]' per line (needs --tls-client-ca); a mapped "
                 "certificate needs no token")
      ->envname("NORMD_TLS_CLIENT_TENANTS")->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
  app.add_option("--max-concurrent-streams", f->max_concurrent_streams,
                 "HTTP/2 streams (calls) one connection may have open at once; more wait")
      ->envname("NORMD_MAX_CONCURRENT_STREAMS")->capture_default_str()
      ->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
  app.add_option("--max-metadata-bytes", f->max_metadata_bytes,
                 "Largest metadata (HTTP/2 header list) of one call, in bytes")
      ->envname("NORMD_MAX_METADATA_BYTES")->capture_default_str()
      ->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
  app.add_option("--keepalive-min-time", f->keepalive_min_time,
                 "Seconds a client must leave between keepalive pings; the third ping that "
                 "comes sooner ends its connection (GOAWAY too_many_pings)")
      ->envname("NORMD_KEEPALIVE_MIN_TIME")->capture_default_str()
      ->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
  app.add_option("--keepalive-time", f->keepalive_time,
                 "Seconds between the server's pings on a quiet connection (0: no pings)")
      ->envname("NORMD_KEEPALIVE_TIME")->capture_default_str()
      ->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
  app.add_option("--keepalive-timeout", f->keepalive_timeout,
                 "Seconds the server waits for a ping's answer before closing the connection")
      ->envname("NORMD_KEEPALIVE_TIMEOUT")->capture_default_str()
      ->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
  app.add_option("--max-connection-idle", f->max_connection_idle,
                 "Seconds a connection may carry no call before the server closes it (0: no "
                 "limit)")
      ->envname("NORMD_MAX_CONNECTION_IDLE")->capture_default_str()
      ->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
  app.add_option("--max-connection-age", f->max_connection_age,
                 "Seconds after which the server asks a client to reconnect (GOAWAY, +-10% "
                 "jitter; 0: no limit)")
      ->envname("NORMD_MAX_CONNECTION_AGE")->capture_default_str()
      ->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
  app.add_option("--max-connection-age-grace", f->max_connection_age_grace,
                 "Seconds calls still open on an aged connection get to finish before they are "
                 "cancelled (0: no limit, e.g. for long TrainStreams)")
      ->envname("NORMD_MAX_CONNECTION_AGE_GRACE")->capture_default_str()
      ->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
  app.add_flag("--check-config", f->check_config,
               "Validate every flag and environment variable, print the configuration and exit "
               "(0: valid) without serving");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int rc = app.exit(e);
    return rc == 0 ? 0 : 2;
  }
  std::set<std::string> known;
  for (const CLI::Option* opt : app.get_options()) {
    if (!opt->get_envname().empty()) known.insert(opt->get_envname());
  }
  f->unknown_env.clear();
  for (char** e = environ; *e != nullptr; ++e) {
    const std::string entry = *e;
    const std::string name = entry.substr(0, entry.find('='));
    if (name.rfind("NORMD_", 0) == 0 && known.count(name) == 0) f->unknown_env.push_back(name);
  }
  std::sort(f->unknown_env.begin(), f->unknown_env.end());
  return -1;
}

Status ValidateFlags(const Flags& f) {
  NORMD_RETURN_IF_ERROR(CheckAddress(f.listen, "--listen", /*allow_unix=*/true));
  if (!f.metrics.empty()) {
    NORMD_RETURN_IF_ERROR(CheckAddress(f.metrics, "--metrics", /*allow_unix=*/false));
  }
  if (f.data_dir.empty()) return InvalidArgument("--data-dir must not be empty");
  struct stat st;
  if (stat(f.data_dir.c_str(), &st) == 0) {
    if (!S_ISDIR(st.st_mode)) {
      return InvalidArgument("--data-dir '", f.data_dir, "' exists and is not a directory");
    }
    if (access(f.data_dir.c_str(), R_OK | W_OK | X_OK) != 0) {
      return InvalidArgument("--data-dir '", f.data_dir, "' is not writable by this user");
    }
  }
  if (f.max_models < 1) return InvalidArgument("--max-models must be >= 1, got ", f.max_models);
  if (f.max_message_bytes < kMinMessageBytes || f.max_message_bytes > kMaxMessageBytes) {
    return InvalidArgument("--max-message-bytes must be in [", kMinMessageBytes, ", ",
                           kMaxMessageBytes, "], got ", f.max_message_bytes);
  }
  if (f.max_batch_elements < 1) {
    return InvalidArgument("--max-batch-elements must be >= 1, got ", f.max_batch_elements);
  }
  if (f.max_parameters < 1) {
    return InvalidArgument("--max-parameters must be >= 1, got ", f.max_parameters);
  }
  if (f.max_layers < 1) return InvalidArgument("--max-layers must be >= 1, got ", f.max_layers);
  if (f.small_batch_threshold < 0) {
    return InvalidArgument("--small-batch-threshold must be >= 0, got ", f.small_batch_threshold);
  }
  if (f.max_retained_forwards < 0) {
    return InvalidArgument("--max-retained-forwards must be >= 0, got ", f.max_retained_forwards);
  }
  if (!(f.retained_forward_timeout > 0) || f.retained_forward_timeout > 86400) {
    return InvalidArgument("--retained-forward-timeout must be in (0, 86400] seconds, got ",
                           f.retained_forward_timeout);
  }
  if (f.max_queued_per_model < 1) {
    return InvalidArgument("--max-queued-per-model must be >= 1, got ", f.max_queued_per_model);
  }
  if (f.tenant_max_models < 0) {
    return InvalidArgument("--tenant-max-models must be >= 0, got ", f.tenant_max_models);
  }
  if (f.tenant_max_parameters < 0) {
    return InvalidArgument("--tenant-max-parameters must be >= 0, got ", f.tenant_max_parameters);
  }
  if (f.tenant_max_queued < 0) {
    return InvalidArgument("--tenant-max-queued must be >= 0, got ", f.tenant_max_queued);
  }
  if (f.compute_threads < 0 || f.compute_threads > kMaxComputeThreads) {
    return InvalidArgument("--compute-threads must be in [0, ", kMaxComputeThreads, "], got ",
                           f.compute_threads);
  }
  static const char* const kLevels[] = {"trace", "debug", "info",    "warn",
                                        "error", "critical", "off"};
  bool level_ok = false;
  for (const char* l : kLevels) level_ok = level_ok || f.log_level == l;
  if (!level_ok) {
    return InvalidArgument("--log-level must be one of trace, debug, info, warn, error, "
                           "critical, off; got '", f.log_level, "'");
  }
  if (f.keep_checkpoints < 1 || f.keep_checkpoints > 1000) {
    return InvalidArgument("--keep-checkpoints must be in [1, 1000], got ", f.keep_checkpoints);
  }
  if (f.autosave_steps < 0) {
    return InvalidArgument("--autosave-steps must be >= 0, got ", f.autosave_steps);
  }
  if (!(f.autosave_seconds >= 0) || f.autosave_seconds > 86400) {
    return InvalidArgument("--autosave-seconds must be in [0, 86400], got ", f.autosave_seconds);
  }
  if (!(f.drain_timeout >= 0) || f.drain_timeout > 3600) {
    return InvalidArgument("--drain-timeout must be in [0, 3600] seconds, got ", f.drain_timeout);
  }
  if (!(f.job_stall_timeout >= 0) || f.job_stall_timeout > 86400) {
    return InvalidArgument("--job-stall-timeout must be in [0, 86400] seconds, got ",
                           f.job_stall_timeout);
  }
  if (f.max_concurrent_streams < 1 || f.max_concurrent_streams > kMaxConcurrentStreams) {
    return InvalidArgument("--max-concurrent-streams must be in [1, ", kMaxConcurrentStreams,
                           "], got ", f.max_concurrent_streams);
  }
  if (f.max_metadata_bytes < kMinMetadataBytes || f.max_metadata_bytes > kMaxMetadataBytes) {
    return InvalidArgument("--max-metadata-bytes must be in [", kMinMetadataBytes, ", ",
                           kMaxMetadataBytes, "], got ", f.max_metadata_bytes);
  }
  NORMD_RETURN_IF_ERROR(CheckSeconds(f.keepalive_min_time, "--keepalive-min-time", 0.001));
  NORMD_RETURN_IF_ERROR(CheckSeconds(f.keepalive_time, "--keepalive-time", 0));
  NORMD_RETURN_IF_ERROR(CheckSeconds(f.keepalive_timeout, "--keepalive-timeout", 0.001));
  NORMD_RETURN_IF_ERROR(CheckSeconds(f.max_connection_idle, "--max-connection-idle", 0));
  NORMD_RETURN_IF_ERROR(CheckSeconds(f.max_connection_age, "--max-connection-age", 0));
  NORMD_RETURN_IF_ERROR(
      CheckSeconds(f.max_connection_age_grace, "--max-connection-age-grace", 0));
  return ValidateSecurityFlags(f.security);
}

int AvailableCores() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    const int n = CPU_COUNT(&set);
    if (n > 0) return n;
  }
  return std::max(1u, std::thread::hardware_concurrency());
}

ServerOptions ToServerOptions(const Flags& f) {
  ServerOptions o;
  o.listen = f.listen;
  o.metrics = f.metrics;
  o.limits.max_models = f.max_models;
  o.limits.max_parameters = f.max_parameters;
  o.limits.max_batch_elements = f.max_batch_elements;
  o.limits.max_layers = f.max_layers;
  o.limits.max_retained_forwards = f.max_retained_forwards;
  o.limits.retained_forward_timeout = Millis(f.retained_forward_timeout);
  o.limits.max_queued_per_model = f.max_queued_per_model;
  o.limits.small_batch_threshold = f.small_batch_threshold;
  TenantQuotas(f, &o.limits);
  const int cores = AvailableCores();
  o.compute_threads = f.compute_threads > 0 ? f.compute_threads : cores;
  // Fewer request threads than cores: each request's matrix products may use the rest.
  o.threads_per_task = std::max(1, cores / o.compute_threads);
  o.max_message_bytes = f.max_message_bytes;
  o.drain_timeout = Millis(f.drain_timeout);
  o.max_concurrent_streams = f.max_concurrent_streams;
  o.max_metadata_bytes = f.max_metadata_bytes;
  o.keepalive_min_time = Millis(f.keepalive_min_time);
  o.keepalive_time = Millis(f.keepalive_time);
  o.keepalive_timeout = Millis(f.keepalive_timeout);
  o.max_connection_idle = Millis(f.max_connection_idle);
  o.max_connection_age = Millis(f.max_connection_age);
  o.max_connection_age_grace = Millis(f.max_connection_age_grace);
  return o;
}

Status LoadSecurity(const Flags& f, ServerOptions* o) {
  NORMD_RETURN_IF_ERROR(LoadServerCredentials(f.security, &o->credentials));
  std::unique_ptr<Authenticator> auth;
  NORMD_RETURN_IF_ERROR(LoadAuthenticator(f.security, &auth));
  o->authenticator = std::move(auth);
  return Status::Ok();
}

namespace {

// "<seconds>s", or `zero` for 0.
std::string Limit(double seconds, const char* zero) {
  if (seconds == 0) return zero;
  std::ostringstream os;
  os << seconds << "s";
  return os.str();
}

}  // namespace

std::string DescribeFlags(const Flags& f) {
  RegistryLimits limits;
  limits.max_models = f.max_models;
  limits.max_parameters = f.max_parameters;
  limits.max_queued_per_model = f.max_queued_per_model;
  TenantQuotas(f, &limits);
  std::ostringstream os;
  os << "listen=" << f.listen << "\n"
     << "metrics=" << (f.metrics.empty() ? "off" : f.metrics) << "\n"
     << "data_dir=" << f.data_dir << "\n"
     << "max_models=" << f.max_models << "\n"
     << "max_message_bytes=" << f.max_message_bytes << "\n"
     << "max_batch_elements=" << f.max_batch_elements << "\n"
     << "max_parameters=" << f.max_parameters << "\n"
     << "max_layers=" << f.max_layers << "\n"
     << "max_retained_forwards=" << f.max_retained_forwards << "\n"
     << "retained_forward_timeout=" << f.retained_forward_timeout << "s\n"
     << "max_queued_per_model=" << f.max_queued_per_model << "\n"
     << "small_batch_threshold=" << f.small_batch_threshold << "\n"
     << "tenant_max_models=" << limits.tenant_max_models
     << (f.tenant_max_models > 0 ? "" : " (--max-models)") << "\n"
     << "tenant_max_parameters=" << limits.tenant_max_parameters
     << (f.tenant_max_parameters > 0 ? "" : " (--max-models x --max-parameters)") << "\n"
     << "tenant_max_queued=" << limits.tenant_max_queued
     << (f.tenant_max_queued > 0 ? "" : " (--max-models x --max-queued-per-model)") << "\n"
     << "compute_threads="
     << (f.compute_threads > 0 ? f.compute_threads : AvailableCores())
     << (f.compute_threads > 0 ? "" : " (auto)") << "\n"
     << "log_level=" << f.log_level << "\n"
     << "drain_timeout=" << f.drain_timeout << "s\n"
     << "job_stall_timeout=" << Limit(f.job_stall_timeout, "off") << "\n"
     << "persistence=" << (f.in_memory ? "off (in memory)" : "checkpoints") << "\n"
     << "keep_checkpoints=" << f.keep_checkpoints << "\n"
     << "autosave_steps=" << f.autosave_steps << "\n"
     << "autosave_seconds=" << f.autosave_seconds << "s\n"
     << DescribeSecurity(f.security)
     << "max_concurrent_streams=" << f.max_concurrent_streams << "\n"
     << "max_metadata_bytes=" << f.max_metadata_bytes << "\n"
     << "keepalive_min_time=" << f.keepalive_min_time << "s\n"
     << "keepalive_time=" << Limit(f.keepalive_time, "off") << "\n"
     << "keepalive_timeout=" << f.keepalive_timeout << "s\n"
     << "max_connection_idle=" << Limit(f.max_connection_idle, "unlimited") << "\n"
     << "max_connection_age=" << Limit(f.max_connection_age, "unlimited") << "\n"
     << "max_connection_age_grace=" << Limit(f.max_connection_age_grace, "unlimited") << "\n";
  return os.str();
}

}  // namespace normd::server
