// Test harness: runs the real `normd` binary on free loopback ports with a temporary data
// directory, and small helpers the server tests share (specs, tensors, /metrics scraping).
#ifndef NORMD_TESTS_SERVER_NORMD_PROCESS_H_
#define NORMD_TESTS_SERVER_NORMD_PROCESS_H_

#include <grpcpp/grpcpp.h>
#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "normd/v1/normd.grpc.pb.h"

namespace normd::testing {

// One normd process. The binary picks its ports (port 0) and reports them through --port-file,
// so concurrent test processes never race for a port.
class NormdProcess {
 public:
  // Starts normd with `extra_args` after the harness's own flags (a repeated flag: last wins).
  // Waits until the port file appears and gRPC answers. Null on failure, with *error set.
  static std::unique_ptr<NormdProcess> Start(const std::vector<std::string>& extra_args,
                                             std::string* error);
  ~NormdProcess();  // SIGKILL if still running; removes the temporary directory

  int grpc_port() const { return grpc_port_; }
  int metrics_port() const { return metrics_port_; }
  std::string address() const { return "127.0.0.1:" + std::to_string(grpc_port_); }
  pid_t pid() const { return pid_; }
  const std::string& dir() const { return dir_; }

  std::shared_ptr<grpc::Channel> NewChannel() const;
  std::unique_ptr<v1::Trainer::Stub> NewStub() const;

  // Sends `signal` and waits up to `timeout` for the exit. Returns the exit code, 128 + signal
  // when killed by a signal, or -1 on timeout.
  int Stop(int signal, std::chrono::milliseconds timeout);
  // The server's log (stderr) so far.
  std::string Log() const;

 private:
  NormdProcess() = default;
  pid_t pid_ = -1;
  std::string dir_;
  int grpc_port_ = 0;
  int metrics_port_ = 0;
};

// A client context with a deadline.
std::unique_ptr<grpc::ClientContext> Ctx(std::chrono::milliseconds timeout =
                                             std::chrono::seconds(30));

// The small reference model: in -> Linear(hidden) -> BatchNorm1d -> ReLU -> Linear(out),
// cross-entropy, SGD(lr, momentum 0.9).
v1::ModelSpec MlpSpec(int in = 32, int hidden = 64, int out = 10, uint64_t seed = 1,
                      float lr = 0.05f);

// Deterministic pseudo-random values in [-1, 1) * scale + shift.
std::vector<float> RandomValues(size_t n, uint64_t seed, float scale = 1.0f, float shift = 0.0f);
std::vector<int64_t> RandomLabels(size_t n, int classes, uint64_t seed);

v1::Tensor MakeTensor(const std::vector<int64_t>& shape, const std::vector<float>& values,
                      bool raw = false);
// The values of a tensor in either encoding.
std::vector<float> Values(const v1::Tensor& t);
// name -> values of a ModelState.
std::map<std::string, std::vector<float>> StateMap(const v1::ModelState& state);
// True when a and b hold bit-identical floats.
bool BitEqual(const std::vector<float>& a, const std::vector<float>& b);

// GET http://127.0.0.1:port/path; the body, or "" on failure.
std::string HttpGet(int port, const std::string& path);

// The value of the sample `name{labels}` in a text exposition, where `labels` is a list of
// label="value" pairs that must all be present. NaN when absent.
double MetricValue(const std::string& exposition, const std::string& name,
                   const std::vector<std::string>& labels = {});

}  // namespace normd::testing

#endif  // NORMD_TESTS_SERVER_NORMD_PROCESS_H_
