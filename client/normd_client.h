// normd C++ client: a typed wrapper over the generated normd.v1.Trainer stub.
//
// One Client owns one gRPC channel. Every unary call carries a deadline (ClientOptions::timeout),
// tensors travel in the raw little-endian float32 encoding, and a non-OK status becomes an
// Error exception carrying the gRPC code and the server's message. Tensors go in as Eigen
// row-major matrices, Tensor values or (pointer, shape) views, and come back as Tensor.
//
// Thread-safety: a Client may be used from several threads at once (gRPC channels and stubs are
// thread-safe). A TrainStream is a single session and must be used by one thread at a time.
//
// Errors are exceptions here, unlike in core/: the callers (normctl, tests, examples) stop at the
// first failed call and report it, which exceptions express directly.
#ifndef NORMD_CLIENT_NORMD_CLIENT_H_
#define NORMD_CLIENT_NORMD_CLIENT_H_

#include <grpcpp/grpcpp.h>

#include <Eigen/Core>
#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "grpc/health/v1/health.grpc.pb.h"
#include "normd/v1/normd.grpc.pb.h"

namespace normd::client {

// Row-major like the wire: one sample per row.
using Matrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// How to reach a server. Defaults suit a local, unsecured normd.
struct ClientOptions {
  std::string server = "127.0.0.1:50051";  // host:port, or any gRPC target URI
  // Deadline of every unary call, counted from the call's start.
  std::chrono::milliseconds timeout{std::chrono::seconds(30)};
  // Deadline of a whole TrainStream session (a stream may carry an epoch or more).
  std::chrono::milliseconds stream_timeout{std::chrono::hours(24)};
  // Largest response accepted (GetState of a big model can exceed gRPC's 4 MiB default).
  int max_receive_bytes = 256 << 20;

  // Transport security. With use_tls false the channel is plaintext and the tls_* fields are
  // ignored. tls_ca_file empty means the system's root certificates; tls_cert_file and
  // tls_key_file (both or neither) present a client certificate for mutual TLS.
  bool use_tls = false;
  std::string tls_ca_file;
  std::string tls_cert_file;
  std::string tls_key_file;
  std::string tls_server_name;  // overrides the name checked against the server certificate

  // When non-empty, every call carries "authorization: Bearer <auth_token>".
  std::string auth_token;
};

// A failed call: the gRPC status code and the server's message. what() reads
// "<Method>: <CODE>: <message>". Local failures (unreadable certificate, malformed response)
// use the closest gRPC code.
class Error : public std::runtime_error {
 public:
  Error(grpc::StatusCode code, const std::string& message, const std::string& method = "");

  grpc::StatusCode code() const { return code_; }
  const std::string& message() const { return message_; }  // without method or code
  const std::string& method() const { return method_; }

 private:
  grpc::StatusCode code_;
  std::string message_;
  std::string method_;
};

// "NOT_FOUND", "INVALID_ARGUMENT", ...
const char* StatusCodeName(grpc::StatusCode code);

// A dense row-major float32 tensor owned by the caller; the first dimension is the batch.
struct Tensor {
  std::vector<int64_t> shape;
  std::vector<float> values;

  int64_t rows() const;  // shape[0], 1 for a scalar
  int64_t cols() const;  // elements per row
  // The tensor as a (rows, cols) matrix. Valid while the Tensor lives and is not resized.
  Eigen::Map<const Matrix> matrix() const;
  static Tensor FromMatrix(const Matrix& m);
};

// A non-owning view of row-major float32 data with a shape; converts implicitly from a Matrix
// (shape (rows, cols)) or a Tensor so calls read naturally. The data must outlive the call.
class TensorView {
 public:
  TensorView(const float* data, std::vector<int64_t> shape);
  TensorView(const Matrix& m);                    // NOLINT(runtime/explicit)
  TensorView(const Eigen::Map<const Matrix>& m);  // NOLINT(runtime/explicit)
  TensorView(const Tensor& t);                    // NOLINT(runtime/explicit)

  const float* data() const { return data_; }
  const std::vector<int64_t>& shape() const { return shape_; }
  int64_t size() const;  // product of the shape

 private:
  const float* data_;
  std::vector<int64_t> shape_;
};

// Wire conversions, exposed for callers that build requests themselves.
// Encode writes the raw encoding. Decode accepts either encoding and throws Error(INTERNAL)
// when the payload does not match the shape.
void EncodeTensor(const TensorView& t, v1::Tensor* out);
Tensor DecodeTensor(const v1::Tensor& t);

struct ForwardResult {
  Tensor output;
  uint64_t forward_id = 0;                  // non-zero when retain_for_backward was set
  std::vector<v1::LayerStats> layer_stats;  // filled when layer_stats was set
};

struct NamedTensor {
  std::string name;  // PyTorch state_dict name, e.g. "1.running_mean"
  Tensor tensor;
};

// One TrainStream session: batches go out, one TrainStepResponse per batch comes back in order.
// Write may run ahead of Read (the caller bounds how far); Finish half-closes the stream,
// returns the responses not yet read and checks the final status. A server error ends the
// stream: the next Write or Read throws it. Destroying an unfinished session cancels it.
class TrainStream {
 public:
  ~TrainStream();
  TrainStream(const TrainStream&) = delete;
  TrainStream& operator=(const TrainStream&) = delete;

  // Classification (cross-entropy): one label per sample.
  void Write(const TensorView& input, const std::vector<int64_t>& labels);
  // Regression / BCE: a target tensor shaped like the model's output.
  void WriteWithTarget(const TensorView& input, const TensorView& target);
  // The response to the oldest batch not yet read. REQUIRES: pending() > 0.
  v1::TrainStepResponse Read();
  std::vector<v1::TrainStepResponse> Finish();

  int64_t pending() const { return pending_; }  // batches written but not yet read

 private:
  friend class Client;
  TrainStream(std::string model, std::unique_ptr<grpc::ClientContext> context,
              v1::Trainer::Stub* stub);
  void Send();
  [[noreturn]] void FailWithFinalStatus();

  std::string model_;
  std::unique_ptr<grpc::ClientContext> context_;
  std::unique_ptr<grpc::ClientReaderWriter<v1::TrainStepRequest, v1::TrainStepResponse>> stream_;
  v1::TrainStepRequest request_;  // reused between batches
  int64_t pending_ = 0;
  bool done_ = false;
};

class Client {
 public:
  // Creates the channel (connection happens lazily, on the first call). Throws Error when a
  // TLS file cannot be read.
  explicit Client(ClientOptions options = ClientOptions());

  const ClientOptions& options() const { return options_; }

  // Model lifecycle. An empty id lets the server pick one.
  v1::Model CreateModel(const v1::ModelSpec& spec, const std::string& id = "");
  v1::Model GetModel(const std::string& model);
  std::vector<v1::Model> ListModels();
  void DeleteModel(const std::string& model);
  // freeze_running_stats unset keeps the model's current setting.
  v1::Model SetMode(const std::string& model, v1::Mode mode,
                    std::optional<bool> freeze_running_stats = std::nullopt);
  v1::Model ResetRunningStats(const std::string& model);
  // Replaces the optimizer's hyperparameters (same kind), its learning-rate schedule, clipping
  // and parameter groups, keeping its state (a changed schedule restarts from its step 0).
  v1::Model UpdateOptimizer(const std::string& model, const v1::OptimizerSpec& optimizer);
  // Returns the step held by the durable checkpoint.
  uint64_t SaveModel(const std::string& model);
  // Per-layer frozen/trainable flags (a field left unset keeps its value); all or nothing.
  v1::Model SetLayerOptions(const std::string& model, const std::vector<v1::LayerOptions>& layers);
  // The model with its BatchNorms folded into the preceding Linear/Conv2d; a non-empty
  // new_model also creates it on the server as an inference-only copy.
  v1::FoldBatchNormResponse FoldBatchNorm(const std::string& model,
                                          const std::string& new_model = "");

  // Forward in the model's current mode (a training-mode forward updates BatchNorm statistics).
  ForwardResult Forward(const std::string& model, const TensorView& input,
                        bool retain_for_backward = false, bool layer_stats = false);
  // Returns the input gradient when return_grad_input is set, an empty Tensor otherwise.
  Tensor Backward(const std::string& model, uint64_t forward_id, const TensorView& grad_output,
                  bool return_grad_input = false);
  // One optimizer step on the accumulated gradients: the new step, the gradients' total norm
  // before clipping (grad_norm) and the learning rate the step used.
  v1::ApplyGradientsResponse ApplyGradients(const std::string& model);

  // One step: loss, step, samples, grad_norm (before clipping) and the learning rate used.
  v1::TrainStepResponse TrainStep(const std::string& model, const TensorView& input,
                                  const std::vector<int64_t>& labels);
  v1::TrainStepResponse TrainStepWithTarget(const std::string& model, const TensorView& input,
                                            const TensorView& target);
  std::unique_ptr<TrainStream> OpenTrainStream(const std::string& model);

  // AdaptStatistics over one stream: every batch of `batches` goes out in order; the server
  // replaces each tracked, non-frozen BatchNorm layer's running statistics with the pooled mean
  // and unbiased variance of all values that reached it, only once every batch succeeded.
  // Returns the updated model. Deadline: stream_timeout.
  v1::Model AdaptStatistics(const std::string& model, const std::vector<TensorView>& batches);

  // Loss and accuracy in eval semantics; changes nothing on the server.
  v1::EvaluateResponse Evaluate(const std::string& model, const TensorView& input,
                                const std::vector<int64_t>& labels);
  v1::EvaluateResponse EvaluateWithTarget(const std::string& model, const TensorView& input,
                                          const TensorView& target);

  std::vector<NamedTensor> GetState(const std::string& model, bool include_optimizer = false);
  v1::Model SetState(const std::string& model, const std::vector<NamedTensor>& state,
                     bool strict = true);

  // grpc.health.v1.Health/Check for `service` ("" = the whole server).
  grpc::health::v1::HealthCheckResponse::ServingStatus Health(const std::string& service = "");
  // Data-parallel jobs: every rank's digest of its replicas (a single process: world_size 1).
  v1::CheckReplicasResponse CheckReplicas();

  // The raw stub, for calls this wrapper does not cover. Use NewContext() for the deadline and
  // credentials metadata.
  v1::Trainer::Stub& stub() { return *stub_; }
  std::unique_ptr<grpc::ClientContext> NewContext(std::chrono::milliseconds timeout) const;

 private:
  ClientOptions options_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::Trainer::Stub> stub_;
  std::unique_ptr<grpc::health::v1::Health::Stub> health_stub_;
};

}  // namespace normd::client

#endif  // NORMD_CLIENT_NORMD_CLIENT_H_
