#include "server/server.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/health_check_service_interface.h>
#include <grpcpp/impl/server_builder_option.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <limits>

#ifndef NORMD_VERSION
#define NORMD_VERSION "unknown"
#endif

namespace normd::server {
namespace {

constexpr char kTrainerService[] = "normd.v1.Trainer";

// Takes the reflection plugin (registered process-wide by InitProtoReflectionServerBuilderPlugin)
// off one builder: with bearer tokens on, reflection would be a service anyone may call.
class WithoutReflection : public grpc::ServerBuilderOption {
 public:
  void UpdateArguments(grpc::ChannelArguments* /*args*/) override {}
  void UpdatePlugins(std::vector<std::unique_ptr<grpc::ServerBuilderPlugin>>* plugins) override {
    plugins->erase(std::remove_if(plugins->begin(), plugins->end(),
                                  [](const std::unique_ptr<grpc::ServerBuilderPlugin>& p) {
                                    return p->name() == "proto_server_reflection";
                                  }),
                   plugins->end());
  }
};

// A duration as a gRPC int milliseconds argument; zero (no limit) is INT_MAX, gRPC's infinity.
int MillisArg(std::chrono::milliseconds ms) {
  constexpr int64_t kInfinite = std::numeric_limits<int>::max();
  return static_cast<int>(ms.count() <= 0 ? kInfinite : std::min<int64_t>(ms.count(), kInfinite));
}

}  // namespace

const char* Version() { return NORMD_VERSION; }

NormdServer::NormdServer(ServerOptions options)
    : options_(std::move(options)), metrics_(std::make_unique<Metrics>(Version())) {}

NormdServer::~NormdServer() { Shutdown(); }

Status NormdServer::Start() {
  pool_ = std::make_unique<ComputePool>(std::max(1, options_.compute_threads),
                                        std::max(1, options_.threads_per_task));
  registry_ = std::make_unique<Registry>(options_.limits, metrics_.get(), pool_.get());
  registry_->set_persistence(options_.persistence);
  metrics_->SetModelCount(0);
  metrics_->SetWorldSize(options_.limits.world_size);
  if (options_.persistence != nullptr) {
    NORMD_RETURN_IF_ERROR(options_.persistence->RestoreAll(registry_.get()));
    spdlog::info("event=restored models={}", registry_->size());
  }
  if (!options_.metrics.empty()) NORMD_RETURN_IF_ERROR(metrics_->Serve(options_.metrics));

  const Authenticator* auth = options_.authenticator.get();
  // Reflection would be a Trainer-schema service that needs no token.
  const bool reflection = auth == nullptr || !auth->tokens_on();
  service_ = std::make_unique<TrainerService>(registry_.get(), metrics_.get(), pool_.get(), auth,
                                             options_.data_parallel);
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  if (!reflection) builder.SetOption(std::make_unique<WithoutReflection>());
  std::shared_ptr<grpc::ServerCredentials> creds =
      options_.credentials != nullptr ? options_.credentials : grpc::InsecureServerCredentials();
  builder.AddListeningPort(options_.listen, creds, &grpc_port_);
  builder.RegisterService(service_.get());
  const int max_bytes = static_cast<int>(
      std::min<int64_t>(options_.max_message_bytes, std::numeric_limits<int>::max()));
  builder.SetMaxReceiveMessageSize(max_bytes);
  builder.SetMaxSendMessageSize(max_bytes);
  builder.AddChannelArgument(GRPC_ARG_MAX_CONCURRENT_STREAMS, options_.max_concurrent_streams);
  builder.AddChannelArgument(GRPC_ARG_MAX_METADATA_SIZE, options_.max_metadata_bytes);
  // Pings are judged by one rule whether calls are in flight or not (gRPC's default for an idle
  // connection is one ping per two hours); the server's own pings find dead peers.
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  builder.AddChannelArgument(
      GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS,
      static_cast<int>(std::clamp<int64_t>(options_.keepalive_min_time.count(), 0,
                                           std::numeric_limits<int>::max())));
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MAX_PING_STRIKES, ServerOptions::kMaxPingStrikes);
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIME_MS, MillisArg(options_.keepalive_time));
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, MillisArg(options_.keepalive_timeout));
  builder.AddChannelArgument(GRPC_ARG_MAX_CONNECTION_IDLE_MS,
                             MillisArg(options_.max_connection_idle));
  builder.AddChannelArgument(GRPC_ARG_MAX_CONNECTION_AGE_MS, MillisArg(options_.max_connection_age));
  builder.AddChannelArgument(GRPC_ARG_MAX_CONNECTION_AGE_GRACE_MS,
                             MillisArg(options_.max_connection_age_grace));
  // gRPC sets SO_REUSEPORT by default: a second normd on the same port would silently share it.
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  options_.interceptors.push_back(MakeUndecodableRequestInterceptorFactory(auth));
  builder.experimental().SetInterceptorCreators(std::move(options_.interceptors));
  server_ = builder.BuildAndStart();
  if (server_ == nullptr || grpc_port_ == 0) {
    server_.reset();
    return Status(StatusCode::kUnavailable,
                  StrCat("cannot listen for gRPC on ", options_.listen,
                         " (address in use, not local, or malformed)"));
  }
  grpc::HealthCheckServiceInterface* health = server_->GetHealthCheckService();
  health->SetServingStatus(true);
  health->SetServingStatus(kTrainerService, true);
  serving_ = true;
  spdlog::info("event=serving version={} listen={} grpc_port={} metrics={} metrics_port={} "
               "compute_threads={} threads_per_task={} max_models={} models={} tls={} auth={} "
               "reflection={}",
               Version(), options_.listen, grpc_port_,
               options_.metrics.empty() ? "off" : options_.metrics, metrics_->port(),
               pool_->threads(), std::max(1, options_.threads_per_task),
               options_.limits.max_models, registry_->size(),
               options_.credentials != nullptr ? "on" : "off", reflection ? "off" : "bearer",
               reflection ? "on" : "off");
  return Status::Ok();
}

void NormdServer::Shutdown() {
  if (!serving_) return;
  serving_ = false;
  const auto begin = std::chrono::steady_clock::now();
  // Load balancers and probes see NOT_SERVING first; Watch streams are told.
  server_->GetHealthCheckService()->Shutdown();
  // New Trainer calls answer UNAVAILABLE from here on; idle TrainStreams end now.
  service_->BeginShutdown();
  // Wait for the Trainer calls in flight, not for long-lived streams that carry no work
  // (health Watch, reflection): those are cancelled next, with anything past the deadline.
  const bool idle = service_->WaitIdle(begin + options_.drain_timeout);
  // The NOT_SERVING notice is written to each Watch stream asynchronously; cancelling the
  // streams at once can drop it (seen under load). Open streams get up to a second from the
  // notice (never past the drain timeout) before they are cancelled; with none open, Shutdown
  // returns as soon as the calls above are done.
  const auto notice_grace = std::min<std::chrono::steady_clock::duration>(
      std::chrono::seconds(1), options_.drain_timeout);
  const auto until = std::max(begin + notice_grace, std::chrono::steady_clock::now());
  server_->Shutdown(std::chrono::system_clock::now() +
                    (until - std::chrono::steady_clock::now()));
  pool_.reset();  // every queued task has finished its call; join the threads
  const auto drained = std::chrono::steady_clock::now();
  if (options_.persistence != nullptr) options_.persistence->OnShutdown(registry_.get());
  const auto saved = std::chrono::steady_clock::now();
  using Ms = std::chrono::milliseconds;
  spdlog::info("event=stopped drained={} drain_ms={} save_ms={} models={}",
               idle ? "all" : "deadline",
               std::chrono::duration_cast<Ms>(drained - begin).count(),
               std::chrono::duration_cast<Ms>(saved - drained).count(), registry_->size());
}

}  // namespace normd::server
