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

#include "mpi/mpi_collective.h"
#include "server/checkpoint_persistence.h"
#include "server/data_parallel.h"
#include "server/flags.h"
#include "server/mpi_job.h"
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

// A digest of this process's executable file: ranks of one job must run the same build.
std::string BinaryDigest() {
  std::ifstream in("/proc/self/exe", std::ios::binary);
  if (!in) return "unreadable";
  uint64_t h = 1469598103934665603ull;
  char buf[1 << 16];
  while (in.read(buf, sizeof buf) || in.gcount() > 0) {
    for (std::streamsize i = 0; i < in.gcount(); ++i) {
      h ^= static_cast<unsigned char>(buf[i]);
      h *= 1099511628211ull;
    }
  }
  char out[32];
  std::snprintf(out, sizeof out, "%016llx", static_cast<unsigned long long>(h));
  return out;
}

// The build and the flags that decide how models are built and computed: ranks whose
// identities differ must not form a job (server/data_parallel.h, CheckJobIdentity).
normd::server::JobIdentity IdentityOf(const normd::server::Flags& flags) {
  normd::server::JobIdentity id;
  id.items = {
      {"version", normd::server::Version()},
      {"compiler", __VERSION__},
      {"binary", BinaryDigest()},
      {"--max-parameters", std::to_string(flags.max_parameters)},
      {"--max-layers", std::to_string(flags.max_layers)},
      {"--max-batch-elements", std::to_string(flags.max_batch_elements)},
      {"--max-retained-forwards", std::to_string(flags.max_retained_forwards)},
  };
  return id;
}

// The limits models are built with (Registry::ModelLimits), for a worker's replicas.
normd::Sequential::Limits ModelLimitsOf(const normd::server::RegistryLimits& limits) {
  normd::Sequential::Limits l;
  l.max_parameters = limits.max_parameters;
  l.max_layers = limits.max_layers;
  l.max_sample_elements = limits.max_batch_elements;
  return l;
}

// A job's stop signals (see main): written to a pipe by a handler, read by the main thread.
// MPI_Init leaves the main thread with no signal blocked and starts threads of its own that
// block none, so sigwait cannot be relied on there.
int g_stop_pipe[2] = {-1, -1};

void OnStopSignal(int sig) {
  const unsigned char b = static_cast<unsigned char>(sig);
  const ssize_t unused = write(g_stop_pipe[1], &b, 1);
  (void)unused;
}

void InstallStopHandlers(const sigset_t& signals) {
  struct sigaction sa;
  std::memset(&sa, 0, sizeof sa);
  sa.sa_handler = OnStopSignal;
  sa.sa_flags = SA_RESTART;
  sigfillset(&sa.sa_mask);
  for (int sig : {SIGTERM, SIGINT, SIGUSR1}) {
    if (sigismember(&signals, sig) == 1) sigaction(sig, &sa, nullptr);
  }
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
  // In a job, SIGUSR1 stops it too: mpirun forwards SIGUSR1 to every rank and then exits with
  // the ranks' codes, while a SIGTERM to mpirun makes it kill the ranks (SIGKILL after
  // odls_base_sigkill_timeout, 1 s by default) and exit 1. deploy/normd-mpirun turns the
  // orchestrator's SIGTERM into SIGUSR1. Blocked before MPI starts its threads.
  const bool in_job = normd::mpi::LaunchedByMpi();
  if (in_job) sigaddset(&stop_signals, SIGUSR1);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);
  signal(SIGPIPE, SIG_IGN);

  // A rank of a data-parallel job (mpirun -np N normd): MPI only then; see
  // server/data_parallel.h. Rank 0 goes on to serve, the others execute its commands.
  std::unique_ptr<normd::mpi::MpiSession> mpi_session;
  std::unique_ptr<normd::server::MpiJobChannel> job_channel;
  std::unique_ptr<normd::server::DataParallelJob> job;
  if (in_job) {
    const normd::Status s = normd::mpi::MpiSession::Start(&mpi_session);
    if (!s.ok()) {
      spdlog::critical("event=start_failed error=\"{}\"", s.message());
      return 1;
    }
    // MPI_Init unblocked every signal in this thread: block the stop signals again, so the
    // threads started from here on (gRPC, compute) never take them.
    pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);
    job_channel = std::make_unique<normd::server::MpiJobChannel>();
    const std::string differs = normd::server::CheckJobIdentity(job_channel.get(), IdentityOf(flags));
    if (!differs.empty()) {
      spdlog::critical("event=start_failed rank={} error=\"the ranks of this job differ: {}\"",
                       job_channel->rank(), differs);
      job_channel.reset();
      mpi_session.reset();
      return 2;
    }
    spdlog::info("event=job rank={} world_size={}", job_channel->rank(), job_channel->size());
    if (job_channel->rank() == 0) {
      if (pipe(g_stop_pipe) != 0) {
        spdlog::critical("event=start_failed error=\"pipe: {}\"", std::strerror(errno));
        return 1;
      }
      InstallStopHandlers(stop_signals);
    }
    job = std::make_unique<normd::server::DataParallelJob>(
        job_channel.get(), ModelLimitsOf(normd::server::ToServerOptions(flags).limits));
    if (job_channel->rank() != 0) {
      // Workers stop when rank 0 tells them (after it drained and saved), never on a signal:
      // mpirun forwards SIGUSR1 to every rank, Kubernetes sends worker pods SIGTERM.
      for (int ignored : {SIGTERM, SIGINT, SIGUSR1}) signal(ignored, SIG_IGN);
      const int code = job->RunWorker();
      job.reset();
      job_channel.reset();
      mpi_session.reset();
      return code;
    }
    job->StartWatchdog(normd::server::Millis(flags.job_stall_timeout));
  }

  // Rank 0 of a job: the workers leave their loop whenever this function returns, on an error
  // too (MPI_Finalize would otherwise wait for them). Destroyed after the server.
  struct StopWorkers {
    normd::server::DataParallelJob* job;
    ~StopWorkers() {
      if (job != nullptr) job->StopWorkers();
    }
  } stop_workers{job.get()};

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
  if (job != nullptr) {
    job->set_inner(options.persistence);
    options.persistence = job.get();
    options.data_parallel = job.get();
    options.limits.world_size = job_channel->size();
  }
  normd::server::NormdServer server(std::move(options));
  if (job != nullptr) job->set_metrics(&server.metrics());
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
  if (job_channel != nullptr) {
    // Rank 0 of a job: the handlers (InstallStopHandlers) report the signal through the pipe;
    // this thread takes it too from now on, as MPI's own threads may.
    pthread_sigmask(SIG_UNBLOCK, &stop_signals, nullptr);
    unsigned char b = 0;
    while (read(g_stop_pipe[0], &b, 1) != 1) {
    }
    sig = b;
  } else {
    sigwait(&stop_signals, &sig);
  }
  spdlog::info("event=shutdown signal={} drain_timeout_s={}",
               sig == SIGTERM ? "SIGTERM" : sig == SIGUSR1 ? "SIGUSR1" : "SIGINT",
               flags.drain_timeout);
  server.Shutdown();
  return 0;
}
