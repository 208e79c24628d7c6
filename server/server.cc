#include "server/server.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/health_check_service_interface.h>
#include <spdlog/spdlog.h>

#include <algorithm>

#ifndef NORMD_VERSION
#define NORMD_VERSION "unknown"
#endif

namespace normd::server {
namespace {

constexpr char kTrainerService[] = "normd.v1.Trainer";

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
  if (options_.persistence != nullptr) {
    NORMD_RETURN_IF_ERROR(options_.persistence->RestoreAll(registry_.get()));
    spdlog::info("event=restored models={}", registry_->size());
  }
  if (!options_.metrics.empty()) NORMD_RETURN_IF_ERROR(metrics_->Serve(options_.metrics));

  service_ = std::make_unique<TrainerService>(registry_.get(), metrics_.get(), pool_.get());
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  std::shared_ptr<grpc::ServerCredentials> creds =
      options_.credentials != nullptr ? options_.credentials : grpc::InsecureServerCredentials();
  builder.AddListeningPort(options_.listen, creds, &grpc_port_);
  builder.RegisterService(service_.get());
  const int max_bytes = static_cast<int>(
      std::min<int64_t>(options_.max_message_bytes, std::numeric_limits<int>::max()));
  builder.SetMaxReceiveMessageSize(max_bytes);
  builder.SetMaxSendMessageSize(max_bytes);
  builder.AddChannelArgument(GRPC_ARG_MAX_CONCURRENT_STREAMS, options_.max_concurrent_streams);
  // gRPC sets SO_REUSEPORT by default: a second normd on the same port would silently share it.
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  if (!options_.interceptors.empty()) {
    builder.experimental().SetInterceptorCreators(std::move(options_.interceptors));
  }
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
               "compute_threads={} threads_per_task={} max_models={} models={}",
               Version(), options_.listen, grpc_port_,
               options_.metrics.empty() ? "off" : options_.metrics, metrics_->port(),
               pool_->threads(), std::max(1, options_.threads_per_task),
               options_.limits.max_models, registry_->size());
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
  server_->Shutdown(std::chrono::system_clock::now());
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
