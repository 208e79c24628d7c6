#include "client/normd_client.h"

#include <cstring>
#include <fstream>
#include <sstream>
#include <utility>

namespace normd::client {

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
              "the raw tensor encoding is little-endian float32; a big-endian host needs a swap");

namespace {

int64_t Product(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::string ReadFile(const std::string& path, const char* what) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    throw Error(grpc::StatusCode::INVALID_ARGUMENT,
                std::string("cannot read ") + what + " file '" + path + "'");
  }
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

void Check(const grpc::Status& status, const char* method) {
  if (!status.ok()) throw Error(status.error_code(), status.error_message(), method);
}

std::shared_ptr<grpc::ChannelCredentials> MakeCredentials(const ClientOptions& o) {
  if (!o.use_tls) return grpc::InsecureChannelCredentials();
  grpc::SslCredentialsOptions ssl;
  if (!o.tls_ca_file.empty()) ssl.pem_root_certs = ReadFile(o.tls_ca_file, "TLS CA");
  if (o.tls_cert_file.empty() != o.tls_key_file.empty()) {
    throw Error(grpc::StatusCode::INVALID_ARGUMENT,
                "a client certificate needs both the certificate and the key file");
  }
  if (!o.tls_cert_file.empty()) {
    ssl.pem_cert_chain = ReadFile(o.tls_cert_file, "TLS certificate");
    ssl.pem_private_key = ReadFile(o.tls_key_file, "TLS key");
  }
  return grpc::SslCredentials(ssl);
}

}  // namespace

Error::Error(grpc::StatusCode code, const std::string& message, const std::string& method)
    : std::runtime_error((method.empty() ? "" : method + ": ") + StatusCodeName(code) + ": " +
                         message),
      code_(code),
      message_(message),
      method_(method) {}

const char* StatusCodeName(grpc::StatusCode code) {
  switch (code) {
    case grpc::StatusCode::OK:
      return "OK";
    case grpc::StatusCode::CANCELLED:
      return "CANCELLED";
    case grpc::StatusCode::UNKNOWN:
      return "UNKNOWN";
    case grpc::StatusCode::INVALID_ARGUMENT:
      return "INVALID_ARGUMENT";
    case grpc::StatusCode::DEADLINE_EXCEEDED:
      return "DEADLINE_EXCEEDED";
    case grpc::StatusCode::NOT_FOUND:
      return "NOT_FOUND";
    case grpc::StatusCode::ALREADY_EXISTS:
      return "ALREADY_EXISTS";
    case grpc::StatusCode::PERMISSION_DENIED:
      return "PERMISSION_DENIED";
    case grpc::StatusCode::RESOURCE_EXHAUSTED:
      return "RESOURCE_EXHAUSTED";
    case grpc::StatusCode::FAILED_PRECONDITION:
      return "FAILED_PRECONDITION";
    case grpc::StatusCode::ABORTED:
      return "ABORTED";
    case grpc::StatusCode::OUT_OF_RANGE:
      return "OUT_OF_RANGE";
    case grpc::StatusCode::UNIMPLEMENTED:
      return "UNIMPLEMENTED";
    case grpc::StatusCode::INTERNAL:
      return "INTERNAL";
    case grpc::StatusCode::UNAVAILABLE:
      return "UNAVAILABLE";
    case grpc::StatusCode::DATA_LOSS:
      return "DATA_LOSS";
    case grpc::StatusCode::UNAUTHENTICATED:
      return "UNAUTHENTICATED";
    default:
      return "UNKNOWN_CODE";
  }
}

// ----------------------------------------------------------------------------- tensors

int64_t Tensor::rows() const { return shape.empty() ? 1 : shape[0]; }
int64_t Tensor::cols() const {
  const int64_t r = rows();
  return r == 0 ? 0 : static_cast<int64_t>(values.size()) / r;
}
Eigen::Map<const Matrix> Tensor::matrix() const {
  return Eigen::Map<const Matrix>(values.data(), rows(), cols());
}
Tensor Tensor::FromMatrix(const Matrix& m) {
  Tensor t;
  t.shape = {m.rows(), m.cols()};
  t.values.assign(m.data(), m.data() + m.size());
  return t;
}

TensorView::TensorView(const float* data, std::vector<int64_t> shape)
    : data_(data), shape_(std::move(shape)) {}
TensorView::TensorView(const Matrix& m) : data_(m.data()), shape_{m.rows(), m.cols()} {}
TensorView::TensorView(const Eigen::Map<const Matrix>& m)
    : data_(m.data()), shape_{m.rows(), m.cols()} {}
TensorView::TensorView(const Tensor& t) : data_(t.values.data()), shape_(t.shape) {}
int64_t TensorView::size() const { return Product(shape_); }

void EncodeTensor(const TensorView& t, v1::Tensor* out) {
  out->Clear();
  out->mutable_shape()->Add(t.shape().begin(), t.shape().end());
  out->mutable_raw()->assign(reinterpret_cast<const char*>(t.data()),
                             static_cast<size_t>(t.size()) * sizeof(float));
}

Tensor DecodeTensor(const v1::Tensor& t) {
  Tensor out;
  out.shape.assign(t.shape().begin(), t.shape().end());
  const int64_t n = Product(out.shape);
  if (!t.raw().empty()) {
    if (t.raw().size() != static_cast<size_t>(n) * sizeof(float)) {
      throw Error(grpc::StatusCode::INTERNAL,
                  "response tensor has " + std::to_string(t.raw().size()) +
                      " raw bytes for shape of " + std::to_string(n) + " elements");
    }
    out.values.resize(n);
    std::memcpy(out.values.data(), t.raw().data(), t.raw().size());
  } else {
    if (t.values_size() != n) {
      throw Error(grpc::StatusCode::INTERNAL,
                  "response tensor has " + std::to_string(t.values_size()) +
                      " values for shape of " + std::to_string(n) + " elements");
    }
    out.values.assign(t.values().begin(), t.values().end());
  }
  return out;
}

// ----------------------------------------------------------------------------- TrainStream

TrainStream::TrainStream(std::string model, std::unique_ptr<grpc::ClientContext> context,
                         v1::Trainer::Stub* stub)
    : model_(std::move(model)), context_(std::move(context)) {
  stream_ = stub->TrainStream(context_.get());
  request_.set_model(model_);
}

TrainStream::~TrainStream() {
  if (!done_) {
    context_->TryCancel();
    stream_->Finish();  // reaps the call; its CANCELLED status is expected
  }
}

void TrainStream::Write(const TensorView& input, const std::vector<int64_t>& labels) {
  request_.clear_target();
  EncodeTensor(input, request_.mutable_input());
  request_.mutable_labels()->Assign(labels.begin(), labels.end());
  Send();
}

void TrainStream::WriteWithTarget(const TensorView& input, const TensorView& target) {
  request_.clear_labels();
  EncodeTensor(input, request_.mutable_input());
  EncodeTensor(target, request_.mutable_target());
  Send();
}

void TrainStream::Send() {
  if (done_) throw Error(grpc::StatusCode::FAILED_PRECONDITION, "stream finished", "TrainStream");
  if (!stream_->Write(request_)) FailWithFinalStatus();
  ++pending_;
}

v1::TrainStepResponse TrainStream::Read() {
  if (done_ || pending_ == 0) {
    throw Error(grpc::StatusCode::FAILED_PRECONDITION, "no batch awaiting a response",
                "TrainStream");
  }
  v1::TrainStepResponse response;
  if (!stream_->Read(&response)) FailWithFinalStatus();
  --pending_;
  return response;
}

std::vector<v1::TrainStepResponse> TrainStream::Finish() {
  std::vector<v1::TrainStepResponse> rest;
  if (done_) return rest;
  stream_->WritesDone();
  v1::TrainStepResponse response;
  while (stream_->Read(&response)) {
    rest.push_back(response);
    --pending_;
  }
  done_ = true;
  Check(stream_->Finish(), "TrainStream");
  if (pending_ != 0) {
    throw Error(grpc::StatusCode::INTERNAL,
                "server closed the stream with " + std::to_string(pending_) + " batches unanswered",
                "TrainStream");
  }
  return rest;
}

void TrainStream::FailWithFinalStatus() {
  // The stream broke: the server has ended the call. Its status says why.
  done_ = true;
  v1::TrainStepResponse ignored;
  while (stream_->Read(&ignored)) {
  }
  grpc::Status status = stream_->Finish();
  if (status.ok()) {
    status = grpc::Status(grpc::StatusCode::INTERNAL, "server ended the stream early");
  }
  throw Error(status.error_code(), status.error_message(), "TrainStream");
}

// ----------------------------------------------------------------------------- Client

Client::Client(ClientOptions options) : options_(std::move(options)) {
  // gRPC aborts the process on a header value it cannot send: refuse such a token here.
  for (const char c : options_.auth_token) {
    if (c < 0x21 || c > 0x7e) {
      throw Error(grpc::StatusCode::INVALID_ARGUMENT,
                  "the bearer token must be printable ASCII without spaces or line breaks");
    }
  }
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(options_.max_receive_bytes);
  args.SetMaxSendMessageSize(-1);
  if (options_.use_tls && !options_.tls_server_name.empty()) {
    args.SetSslTargetNameOverride(options_.tls_server_name);
  }
  channel_ = grpc::CreateCustomChannel(options_.server, MakeCredentials(options_), args);
  stub_ = v1::Trainer::NewStub(channel_);
  health_stub_ = grpc::health::v1::Health::NewStub(channel_);
}

std::unique_ptr<grpc::ClientContext> Client::NewContext(std::chrono::milliseconds timeout) const {
  auto context = std::make_unique<grpc::ClientContext>();
  context->set_deadline(std::chrono::system_clock::now() + timeout);
  if (!options_.auth_token.empty()) {
    context->AddMetadata("authorization", "Bearer " + options_.auth_token);
  }
  return context;
}

v1::Model Client::CreateModel(const v1::ModelSpec& spec, const std::string& id) {
  v1::CreateModelRequest request;
  request.set_id(id);
  *request.mutable_spec() = spec;
  v1::Model response;
  Check(stub_->CreateModel(NewContext(options_.timeout).get(), request, &response), "CreateModel");
  return response;
}

v1::Model Client::GetModel(const std::string& model) {
  v1::GetModelRequest request;
  request.set_model(model);
  v1::Model response;
  Check(stub_->GetModel(NewContext(options_.timeout).get(), request, &response), "GetModel");
  return response;
}

v1::CheckReplicasResponse Client::CheckReplicas() {
  v1::CheckReplicasResponse response;
  Check(stub_->CheckReplicas(NewContext(options_.timeout).get(), v1::CheckReplicasRequest(),
                             &response),
        "CheckReplicas");
  return response;
}

std::vector<v1::Model> Client::ListModels() {
  v1::ListModelsResponse response;
  Check(stub_->ListModels(NewContext(options_.timeout).get(), v1::ListModelsRequest(), &response),
        "ListModels");
  return {response.models().begin(), response.models().end()};
}

void Client::DeleteModel(const std::string& model) {
  v1::DeleteModelRequest request;
  request.set_model(model);
  v1::DeleteModelResponse response;
  Check(stub_->DeleteModel(NewContext(options_.timeout).get(), request, &response), "DeleteModel");
}

v1::Model Client::SetMode(const std::string& model, v1::Mode mode,
                          std::optional<bool> freeze_running_stats) {
  v1::SetModeRequest request;
  request.set_model(model);
  request.set_mode(mode);
  if (freeze_running_stats) request.set_freeze_running_stats(*freeze_running_stats);
  v1::Model response;
  Check(stub_->SetMode(NewContext(options_.timeout).get(), request, &response), "SetMode");
  return response;
}

v1::Model Client::ResetRunningStats(const std::string& model) {
  v1::ResetRunningStatsRequest request;
  request.set_model(model);
  v1::Model response;
  Check(stub_->ResetRunningStats(NewContext(options_.timeout).get(), request, &response),
        "ResetRunningStats");
  return response;
}

v1::Model Client::UpdateOptimizer(const std::string& model, const v1::OptimizerSpec& optimizer) {
  v1::UpdateOptimizerRequest request;
  request.set_model(model);
  *request.mutable_optimizer() = optimizer;
  v1::Model response;
  Check(stub_->UpdateOptimizer(NewContext(options_.timeout).get(), request, &response),
        "UpdateOptimizer");
  return response;
}

uint64_t Client::SaveModel(const std::string& model) {
  v1::SaveModelRequest request;
  request.set_model(model);
  v1::SaveModelResponse response;
  Check(stub_->SaveModel(NewContext(options_.timeout).get(), request, &response), "SaveModel");
  return response.step();
}

v1::Model Client::SetLayerOptions(const std::string& model,
                                  const std::vector<v1::LayerOptions>& layers) {
  v1::SetLayerOptionsRequest request;
  request.set_model(model);
  for (const v1::LayerOptions& l : layers) *request.add_layers() = l;
  v1::Model response;
  Check(stub_->SetLayerOptions(NewContext(options_.timeout).get(), request, &response),
        "SetLayerOptions");
  return response;
}

v1::FoldBatchNormResponse Client::FoldBatchNorm(const std::string& model,
                                                const std::string& new_model) {
  v1::FoldBatchNormRequest request;
  request.set_model(model);
  request.set_new_model(new_model);
  v1::FoldBatchNormResponse response;
  Check(stub_->FoldBatchNorm(NewContext(options_.timeout).get(), request, &response),
        "FoldBatchNorm");
  return response;
}

ForwardResult Client::Forward(const std::string& model, const TensorView& input,
                              bool retain_for_backward, bool layer_stats) {
  v1::ForwardRequest request;
  request.set_model(model);
  EncodeTensor(input, request.mutable_input());
  request.set_retain_for_backward(retain_for_backward);
  request.set_layer_stats(layer_stats);
  v1::ForwardResponse response;
  Check(stub_->Forward(NewContext(options_.timeout).get(), request, &response), "Forward");
  ForwardResult result;
  result.output = DecodeTensor(response.output());
  result.forward_id = response.forward_id();
  result.layer_stats.assign(response.layer_stats().begin(), response.layer_stats().end());
  return result;
}

Tensor Client::Backward(const std::string& model, uint64_t forward_id,
                        const TensorView& grad_output, bool return_grad_input) {
  v1::BackwardRequest request;
  request.set_model(model);
  request.set_forward_id(forward_id);
  EncodeTensor(grad_output, request.mutable_grad_output());
  request.set_return_grad_input(return_grad_input);
  v1::BackwardResponse response;
  Check(stub_->Backward(NewContext(options_.timeout).get(), request, &response), "Backward");
  if (!response.has_grad_input()) return Tensor();
  return DecodeTensor(response.grad_input());
}

v1::ApplyGradientsResponse Client::ApplyGradients(const std::string& model) {
  v1::ApplyGradientsRequest request;
  request.set_model(model);
  v1::ApplyGradientsResponse response;
  Check(stub_->ApplyGradients(NewContext(options_.timeout).get(), request, &response),
        "ApplyGradients");
  return response;
}

v1::TrainStepResponse Client::TrainStep(const std::string& model, const TensorView& input,
                                        const std::vector<int64_t>& labels) {
  v1::TrainStepRequest request;
  request.set_model(model);
  EncodeTensor(input, request.mutable_input());
  request.mutable_labels()->Assign(labels.begin(), labels.end());
  v1::TrainStepResponse response;
  Check(stub_->TrainStep(NewContext(options_.timeout).get(), request, &response), "TrainStep");
  return response;
}

v1::TrainStepResponse Client::TrainStepWithTarget(const std::string& model, const TensorView& input,
                                                  const TensorView& target) {
  v1::TrainStepRequest request;
  request.set_model(model);
  EncodeTensor(input, request.mutable_input());
  EncodeTensor(target, request.mutable_target());
  v1::TrainStepResponse response;
  Check(stub_->TrainStep(NewContext(options_.timeout).get(), request, &response), "TrainStep");
  return response;
}

v1::Model Client::AdaptStatistics(const std::string& model,
                                  const std::vector<TensorView>& batches) {
  std::unique_ptr<grpc::ClientContext> context = NewContext(options_.stream_timeout);
  v1::Model response;
  std::unique_ptr<grpc::ClientWriter<v1::AdaptStatisticsRequest>> writer =
      stub_->AdaptStatistics(context.get(), &response);
  for (size_t i = 0; i < batches.size(); ++i) {
    v1::AdaptStatisticsRequest request;
    if (i == 0) request.set_model(model);
    EncodeTensor(batches[i], request.mutable_input());
    if (!writer->Write(request)) break;  // the server ended the call: Finish says why
  }
  writer->WritesDone();
  Check(writer->Finish(), "AdaptStatistics");
  return response;
}

std::unique_ptr<TrainStream> Client::OpenTrainStream(const std::string& model) {
  return std::unique_ptr<TrainStream>(
      new TrainStream(model, NewContext(options_.stream_timeout), stub_.get()));
}

v1::EvaluateResponse Client::Evaluate(const std::string& model, const TensorView& input,
                                      const std::vector<int64_t>& labels) {
  v1::EvaluateRequest request;
  request.set_model(model);
  EncodeTensor(input, request.mutable_input());
  request.mutable_labels()->Assign(labels.begin(), labels.end());
  v1::EvaluateResponse response;
  Check(stub_->Evaluate(NewContext(options_.timeout).get(), request, &response), "Evaluate");
  return response;
}

v1::EvaluateResponse Client::EvaluateWithTarget(const std::string& model, const TensorView& input,
                                                const TensorView& target) {
  v1::EvaluateRequest request;
  request.set_model(model);
  EncodeTensor(input, request.mutable_input());
  EncodeTensor(target, request.mutable_target());
  v1::EvaluateResponse response;
  Check(stub_->Evaluate(NewContext(options_.timeout).get(), request, &response), "Evaluate");
  return response;
}

std::vector<NamedTensor> Client::GetState(const std::string& model, bool include_optimizer) {
  v1::GetStateRequest request;
  request.set_model(model);
  request.set_include_optimizer(include_optimizer);
  v1::ModelState response;
  Check(stub_->GetState(NewContext(options_.timeout).get(), request, &response), "GetState");
  std::vector<NamedTensor> state;
  state.reserve(response.tensors_size());
  for (const v1::NamedTensor& t : response.tensors()) {
    state.push_back({t.name(), DecodeTensor(t.tensor())});
  }
  return state;
}

v1::Model Client::SetState(const std::string& model, const std::vector<NamedTensor>& state,
                           bool strict) {
  v1::SetStateRequest request;
  request.set_model(model);
  request.set_strict(strict);
  for (const NamedTensor& t : state) {
    v1::NamedTensor* out = request.mutable_state()->add_tensors();
    out->set_name(t.name);
    EncodeTensor(t.tensor, out->mutable_tensor());
  }
  v1::Model response;
  Check(stub_->SetState(NewContext(options_.timeout).get(), request, &response), "SetState");
  return response;
}

grpc::health::v1::HealthCheckResponse::ServingStatus Client::Health(const std::string& service) {
  grpc::health::v1::HealthCheckRequest request;
  request.set_service(service);
  grpc::health::v1::HealthCheckResponse response;
  Check(health_stub_->Check(NewContext(options_.timeout).get(), request, &response), "Health");
  return response.status();
}

}  // namespace normd::client
