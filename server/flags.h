// normd's command line. Every flag has an environment fallback named NORMD_ and the flag in
// upper case with '_' for '-' (--max-models <-> NORMD_MAX_MODELS); a flag given on the command
// line wins. Deploy files and scripts depend on these names: keep them.
#ifndef NORMD_SERVER_FLAGS_H_
#define NORMD_SERVER_FLAGS_H_

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include "core/status.h"
#include "server/security.h"
#include "server/server.h"

namespace normd::server {

struct Flags {
  std::string listen = "127.0.0.1:50051";
  std::string metrics = "127.0.0.1:9464";
  std::string data_dir = "./normd-data";
  int max_models = 64;
  int64_t max_message_bytes = int64_t{64} << 20;
  int64_t max_batch_elements = int64_t{16} << 20;
  int64_t max_parameters = int64_t{16} << 20;
  int max_layers = 256;
  int max_retained_forwards = 16;
  double retained_forward_timeout = 60;  // seconds
  int max_queued_per_model = 64;
  // Per-tenant quotas (server/tenant.h); 0: the global figure (see TenantQuotas in flags.cc).
  int tenant_max_models = 0;
  int64_t tenant_max_parameters = 0;
  int tenant_max_queued = 0;
  int64_t small_batch_threshold = 16;  // values per channel; 0: never warn
  int compute_threads = 0;  // 0: one per available core
  std::string log_level = "info";
  double drain_timeout = 10;  // seconds
  double job_stall_timeout = 300;  // seconds; 0: never (data-parallel jobs, rank 0)
  std::string port_file;
  // Persistence (checkpoints in data_dir).
  bool in_memory = false;
  int keep_checkpoints = 3;
  int64_t autosave_steps = 0;    // 0: no step trigger
  double autosave_seconds = 30;  // 0: no time trigger
  // Security: TLS, mutual TLS, bearer tokens (server/security.h).
  SecurityFlags security;
  // HTTP/2 connection limits (ServerOptions), durations in seconds. 0 means no limit for
  // keepalive_time (no server pings), max_connection_idle, _age and _age_grace.
  int max_concurrent_streams = 100;
  int max_metadata_bytes = 8 << 10;
  double keepalive_min_time = 30;
  double keepalive_time = 120;
  double keepalive_timeout = 20;
  double max_connection_idle = 600;
  double max_connection_age = 3600;
  double max_connection_age_grace = 0;
  bool check_config = false;

  // Set by ParseFlags: NORMD_* environment variables that name no flag (a typo, or another
  // tool's setting such as normctl's NORMD_SERVER). Reported, not fatal.
  std::vector<std::string> unknown_env;
};

// Parses argv into `flags`. Returns -1 to go on, or the exit code when the process should stop
// now (--help, --version: 0; a malformed command line: non-zero, after printing why).
int ParseFlags(int argc, char** argv, Flags* flags);

// Semantic checks of every flag (address syntax, ranges, log level, data directory).
// INVALID_ARGUMENT naming the flag.
Status ValidateFlags(const Flags& flags);

// Cores this process may run on (its CPU affinity), at least 1.
int AvailableCores();

// A duration flag's seconds as milliseconds, rounded to the nearest.
std::chrono::milliseconds Millis(double seconds);

// The server options the flags describe (compute_threads 0 resolved to AvailableCores()), without
// the security objects, which LoadSecurity adds.
ServerOptions ToServerOptions(const Flags& flags);

// Reads the certificates, token file and client-tenant file the flags name into
// options->credentials and options->authenticator. REQUIRES: ValidateFlags(flags) is OK (the files may still have changed
// since: INVALID_ARGUMENT naming the flag).
Status LoadSecurity(const Flags& flags, ServerOptions* options);

// One line per flag, "name=value", for the start-up log and --check-config.
std::string DescribeFlags(const Flags& flags);

}  // namespace normd::server

#endif  // NORMD_SERVER_FLAGS_H_
