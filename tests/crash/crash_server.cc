// crash_server: a normd server (server/server.h) with checkpoint persistence, for the crash
// test until the normd binary takes the persistence flags itself. Same flag names as proposed
// for normd:
//   --listen 127.0.0.1:0  --data-dir DIR  --port-file FILE  --keep-checkpoints K
//   --autosave-steps N  --autosave-seconds T
// Writes "grpc=<port>" to the port file once serving; SIGTERM/SIGINT shut it down in order.
#include <signal.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <string>

#include "server/checkpoint_persistence.h"
#include "server/server.h"

int main(int argc, char** argv) {
  std::map<std::string, std::string> flags = {
      {"listen", "127.0.0.1:0"}, {"data-dir", "./normd-data"}, {"port-file", ""},
      {"keep-checkpoints", "3"}, {"autosave-steps", "0"},      {"autosave-seconds", "0"}};
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    std::string value;
    if (arg.rfind("--", 0) != 0) {
      std::fprintf(stderr, "unexpected argument %s\n", arg.c_str());
      return 2;
    }
    arg = arg.substr(2);
    const size_t eq = arg.find('=');
    if (eq != std::string::npos) {
      value = arg.substr(eq + 1);
      arg = arg.substr(0, eq);
    } else if (i + 1 < argc) {
      value = argv[++i];
    }
    if (flags.count(arg) == 0) {
      std::fprintf(stderr, "unknown flag --%s\n", arg.c_str());
      return 2;
    }
    flags[arg] = value;
  }

  sigset_t stop;
  sigemptyset(&stop);
  sigaddset(&stop, SIGTERM);
  sigaddset(&stop, SIGINT);
  pthread_sigmask(SIG_BLOCK, &stop, nullptr);

  normd::server::CheckpointPersistenceOptions popts;
  popts.data_dir = flags["data-dir"];
  popts.keep_last = std::atoi(flags["keep-checkpoints"].c_str());
  popts.autosave_steps = std::strtoull(flags["autosave-steps"].c_str(), nullptr, 10);
  popts.autosave_interval = std::chrono::milliseconds(
      static_cast<int64_t>(std::atof(flags["autosave-seconds"].c_str()) * 1000));
  normd::server::CheckpointPersistence persistence(popts);

  normd::server::ServerOptions options;
  options.listen = flags["listen"];
  options.metrics = "";
  options.compute_threads = 1;
  options.persistence = &persistence;
  normd::server::NormdServer server(std::move(options));
  const normd::Status st = server.Start();
  if (!st.ok()) {
    std::fprintf(stderr, "crash_server: %s\n", st.message().c_str());
    persistence.OnShutdown(&server.registry());
    return 1;
  }
  if (!flags["port-file"].empty()) {
    const std::string tmp = flags["port-file"] + ".tmp";
    std::ofstream(tmp) << "grpc=" << server.grpc_port() << "\n";
    std::rename(tmp.c_str(), flags["port-file"].c_str());
  }
  int sig = 0;
  sigwait(&stop, &sig);
  server.Shutdown();
  return 0;
}
