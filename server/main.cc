// normd: the gRPC training service. See `normd --help` and server/server.h.
#include <signal.h>
#include <sys/resource.h>
#include <spdlog/sinks/stdout_sinks.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>

#include "server/checkpoint_persistence.h"
#include "server/flags.h"
#include "server/server.h"

namespace {

// key=value lines on stderr, UTC timestamps: easy to grep, easy for a log shipper to parse.
void ConfigureLogging(const std::string& level) {
  auto logger = spdlog::stderr_logger_mt("normd");
  spdlog::set_default_logger(logger);
  spdlog::set_pattern("ts=%Y-%m-%dT%H:%M:%S.%fZ level=%l %v", spdlog::pattern_time_type::utc);
  spdlog::set_level(spdlog::level::from_str(level));
  spdlog::flush_on(spdlog::level::info);
}

// Written to a temporary name and renamed, so a reader never sees half a file.
bool WritePortFile(const std::string& path, int grpc_port, int metrics_port) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::trunc);
    out << "grpc=" << grpc_port << "\nmetrics=" << metrics_port << "\n";
    if (!out.good()) return false;
  }
  return std::rename(tmp.c_str(), path.c_str()) == 0;
}

// Raises the soft limit on open files to the hard limit and returns it. gRPC 1.51 stops
// accepting connections for good once accept() runs out of file descriptors (CVE-2023-4785), so
// the more a client must open to get there, the better.
rlim_t RaiseFileLimit() {
  rlimit limit;
  if (getrlimit(RLIMIT_NOFILE, &limit) != 0) return 0;
  if (limit.rlim_cur < limit.rlim_max) {
    rlimit raised = limit;
    raised.rlim_cur = limit.rlim_max;
    if (setrlimit(RLIMIT_NOFILE, &raised) == 0) return raised.rlim_cur;
  }
  return limit.rlim_cur;
}

}  // namespace

int main(int argc, char** argv) {
  using normd::server::Flags;
  Flags flags;
  const int rc = normd::server::ParseFlags(argc, argv, &flags);
  if (rc >= 0) return rc;
  const normd::Status valid = normd::server::ValidateFlags(flags);
  if (!valid.ok()) {
    std::fprintf(stderr, "normd: invalid configuration: %s\n", valid.message().c_str());
    return 2;
  }
  if (flags.check_config) {
    std::printf("normd %s: configuration OK\n%s", normd::server::Version(),
                normd::server::DescribeFlags(flags).c_str());
    for (const std::string& name : flags.unknown_env) {
      std::printf("note: %s is not a normd setting (another tool's, or a typo)\n", name.c_str());
    }
    return 0;
  }
  ConfigureLogging(flags.log_level);
  for (const std::string& name : flags.unknown_env) {
    spdlog::warn("event=unknown_setting env={} note=\"not a normd setting (another tool's, or a "
                 "typo)\"", name);
  }

  // SIGTERM and SIGINT are taken synchronously by this thread (sigwait); every thread started
  // from here on inherits the blocked mask, so no gRPC or compute thread is interrupted.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGTERM);
  sigaddset(&stop_signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);
  signal(SIGPIPE, SIG_IGN);

  normd::server::ServerOptions options = normd::server::ToServerOptions(flags);
  const normd::Status secured = normd::server::LoadSecurity(flags, &options);
  if (!secured.ok()) {
    spdlog::critical("event=start_failed error=\"{}\"", secured.message());
    return 2;
  }
  const normd::server::SecurityFlags& sec = flags.security;
  const bool tokens = options.authenticator && options.authenticator->tokens_on();
  spdlog::info("event=security tls={} mtls={} auth={} tokens={} reflection={} "
               "client_tenants={} open_files={}",
               sec.tls_cert.empty() ? "off" : "on", sec.tls_client_ca.empty() ? "off" : "on",
               tokens ? "bearer" : "off",
               options.authenticator ? options.authenticator->token_count() : 0,
               tokens ? "off" : "on", sec.tls_client_tenants.empty() ? "off" : "on",
               RaiseFileLimit());
  if (sec.tls_cert.empty() && flags.listen.rfind("127.", 0) != 0 &&
      flags.listen.rfind("[::1]", 0) != 0 && flags.listen.rfind("localhost:", 0) != 0 &&
      flags.listen.rfind("unix", 0) != 0) {
    spdlog::warn("event=plaintext_exposed listen={} note=\"gRPC is served without TLS on a "
                 "non-loopback address; see README, Security\"", flags.listen);
  }
  // Checkpoints in --data-dir; declared before the server, which uses it until it stops.
  std::unique_ptr<normd::server::CheckpointPersistence> persistence;
  if (!flags.in_memory) {
    std::error_code ec;
    std::filesystem::create_directories(flags.data_dir, ec);
    if (ec) {
      spdlog::critical("event=start_failed error=\"cannot create --data-dir {}: {}\"",
                       flags.data_dir, ec.message());
      return 1;
    }
    normd::server::CheckpointPersistenceOptions popts;
    popts.data_dir = flags.data_dir;
    popts.keep_last = flags.keep_checkpoints;
    popts.autosave_steps = static_cast<uint64_t>(flags.autosave_steps);
    popts.autosave_interval =
        std::chrono::milliseconds(static_cast<int64_t>(flags.autosave_seconds * 1000.0));
    persistence = std::make_unique<normd::server::CheckpointPersistence>(popts);
    options.persistence = persistence.get();
  }
  normd::server::NormdServer server(std::move(options));
  const normd::Status started = server.Start();
  if (!started.ok()) {
    spdlog::critical("event=start_failed error=\"{}\"", started.message());
    return 1;
  }
  if (!flags.port_file.empty() &&
      !WritePortFile(flags.port_file, server.grpc_port(), server.metrics_port())) {
    spdlog::critical("event=start_failed error=\"cannot write --port-file {}: {}\"",
                     flags.port_file, std::strerror(errno));
    server.Shutdown();
    return 1;
  }

  int sig = 0;
  sigwait(&stop_signals, &sig);
  spdlog::info("event=shutdown signal={} drain_timeout_s={}", sig == SIGTERM ? "SIGTERM" : "SIGINT",
               flags.drain_timeout);
  server.Shutdown();
  return 0;
}
