// NormdServer: the whole service assembled — gRPC server (Trainer, grpc.health.v1, reflection),
// compute pool, model registry and metrics endpoint — with an orderly start and shutdown.
//
// Start: restore models (persistence), serve /metrics, bind gRPC, mark health SERVING.
// Shutdown: health NOT_SERVING, new RPCs refused (UNAVAILABLE), idle TrainStreams ended, in-flight
// RPCs drained for at most drain_timeout (then cancelled), compute finished, and the
// persistence layer's OnShutdown (save what changed).
//
// Security (server/security.h): `credentials` (TLS / mutual TLS) go to the listening port as
// given; with an `authenticator` every Trainer call needs a bearer token and reflection is not
// served; health stays open. The HTTP/2 connection limits below become gRPC channel arguments.
// `persistence` receives the registry's hooks.
//
// Thread safety: Start and Shutdown are called once each, from one thread.
#ifndef NORMD_SERVER_SERVER_H_
#define NORMD_SERVER_SERVER_H_

#include <grpcpp/grpcpp.h>
#include <grpcpp/support/server_interceptor.h>

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "core/status.h"
#include "server/compute_pool.h"
#include "server/metrics.h"
#include "server/persistence.h"
#include "server/registry.h"
#include "server/security.h"
#include "server/service.h"

namespace normd::server {

// The normd version (CMake's project version).
const char* Version();

struct ServerOptions {
  std::string listen = "127.0.0.1:50051";  // port 0: pick a free port (see grpc_port())
  std::string metrics = "127.0.0.1:9464";  // empty: no metrics endpoint
  RegistryLimits limits;
  int compute_threads = 1;
  // Cores one request's compute may use (matrix products); compute_threads x this <= cores.
  int threads_per_task = 1;
  int64_t max_message_bytes = int64_t{64} << 20;
  std::chrono::milliseconds drain_timeout{std::chrono::seconds(10)};

  // HTTP/2 connection limits (see `normd --help`). A zero duration means no limit: no
  // keepalive pings from the server for keepalive_time, any ping rate for keepalive_min_time.
  int max_concurrent_streams = 100;  // streams open at once per connection
  int max_metadata_bytes = 8 << 10;  // request header list (metadata) per call
  // A ping sooner than this after the previous one (with or without calls in flight) is a
  // strike; the strike after kMaxPingStrikes ends the connection with GOAWAY
  // ENHANCE_YOUR_CALM "too_many_pings".
  std::chrono::milliseconds keepalive_min_time{std::chrono::seconds(30)};
  std::chrono::milliseconds keepalive_time{std::chrono::minutes(2)};    // server pings
  std::chrono::milliseconds keepalive_timeout{std::chrono::seconds(20)};  // unanswered: closed
  std::chrono::milliseconds max_connection_idle{std::chrono::minutes(10)};
  std::chrono::milliseconds max_connection_age{std::chrono::hours(1)};
  std::chrono::milliseconds max_connection_age_grace{0};
  static constexpr int kMaxPingStrikes = 2;

  // Null: plaintext.
  std::shared_ptr<grpc::ServerCredentials> credentials;
  // Null: no bearer token or certificate mapping; every call is tenant "default", admin.
  std::shared_ptr<const Authenticator> authenticator;
  std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>>
      interceptors;
  // Not owned; null: models in memory only.
  Persistence* persistence = nullptr;
  // Not owned; rank 0 of a data-parallel job (server/data_parallel.h), null otherwise. It is
  // then also the persistence, and limits.world_size its size.
  DataParallelJob* data_parallel = nullptr;
};

class NormdServer {
 public:
  explicit NormdServer(ServerOptions options);
  ~NormdServer();  // calls Shutdown when still serving
  NormdServer(const NormdServer&) = delete;
  NormdServer& operator=(const NormdServer&) = delete;

  // UNAVAILABLE when an address cannot be bound; the persistence layer's restore error.
  Status Start();
  // Blocks until drained (see above). Idempotent.
  void Shutdown();

  int grpc_port() const { return grpc_port_; }
  int metrics_port() const { return metrics_->port(); }
  Registry& registry() { return *registry_; }
  Metrics& metrics() { return *metrics_; }

 private:
  ServerOptions options_;
  std::unique_ptr<Metrics> metrics_;
  std::unique_ptr<ComputePool> pool_;
  std::unique_ptr<Registry> registry_;
  std::unique_ptr<TrainerService> service_;
  std::unique_ptr<grpc::Server> server_;
  int grpc_port_ = 0;
  bool serving_ = false;
};

}  // namespace normd::server

#endif  // NORMD_SERVER_SERVER_H_
