#include "tests/server/normd_process.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <sstream>
#include <thread>

#ifndef NORMD_BINARY
#error "NORMD_BINARY must name the normd executable"
#endif

namespace normd::testing {
namespace {

uint64_t SplitMix(uint64_t* s) {
  uint64_t z = (*s += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

}  // namespace

std::unique_ptr<NormdProcess> NormdProcess::Start(const std::vector<std::string>& extra_args,
                                                  std::string* error) {
  std::unique_ptr<NormdProcess> p(new NormdProcess());
  std::string tmpl = (std::filesystem::temp_directory_path() / "normd-test-XXXXXX").string();
  if (mkdtemp(tmpl.data()) == nullptr) {
    *error = "mkdtemp failed";
    return nullptr;
  }
  p->dir_ = tmpl;
  const std::string port_file = p->dir_ + "/ports";
  const std::string log_file = p->dir_ + "/normd.log";
  std::vector<std::string> args = {NORMD_BINARY,
                                   "--listen=127.0.0.1:0",
                                   "--metrics=127.0.0.1:0",
                                   "--data-dir=" + p->dir_ + "/data",
                                   "--port-file=" + port_file,
                                   "--log-level=info"};
  args.insert(args.end(), extra_args.begin(), extra_args.end());

  p->pid_ = fork();
  if (p->pid_ < 0) {
    *error = "fork failed";
    return nullptr;
  }
  if (p->pid_ == 0) {
    const int fd = open(log_file.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd >= 0) {
      dup2(fd, STDOUT_FILENO);
      dup2(fd, STDERR_FILENO);
      close(fd);
    }
    std::vector<char*> argv;
    for (std::string& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    execv(argv[0], argv.data());
    _exit(127);
  }

  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (std::chrono::steady_clock::now() < deadline) {
    int status = 0;
    if (waitpid(p->pid_, &status, WNOHANG) == p->pid_) {
      p->pid_ = -1;
      *error = "normd exited during start-up:\n" + ReadFile(log_file);
      return nullptr;
    }
    std::ifstream in(port_file);
    std::string line;
    while (std::getline(in, line)) {
      if (line.rfind("grpc=", 0) == 0) p->grpc_port_ = std::stoi(line.substr(5));
      if (line.rfind("metrics=", 0) == 0) p->metrics_port_ = std::stoi(line.substr(8));
    }
    if (p->grpc_port_ > 0) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  if (p->grpc_port_ == 0) {
    *error = "normd did not report its ports in time:\n" + ReadFile(log_file);
    return nullptr;
  }
  if (!p->NewChannel()->WaitForConnected(std::chrono::system_clock::now() +
                                         std::chrono::seconds(10))) {
    *error = "normd's gRPC port does not answer:\n" + ReadFile(log_file);
    return nullptr;
  }
  return p;
}

NormdProcess::~NormdProcess() {
  if (pid_ > 0) {
    kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
  }
  if (!dir_.empty()) {
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }
}

std::shared_ptr<grpc::Channel> NormdProcess::NewChannel() const {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(256 << 20);
  args.SetMaxSendMessageSize(256 << 20);
  // A fresh connection per channel, so concurrent clients really are separate connections.
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  return grpc::CreateCustomChannel(address(), grpc::InsecureChannelCredentials(), args);
}

std::unique_ptr<v1::Trainer::Stub> NormdProcess::NewStub() const {
  return v1::Trainer::NewStub(NewChannel());
}

int NormdProcess::Stop(int signal, std::chrono::milliseconds timeout) {
  if (pid_ <= 0) return -1;
  kill(pid_, signal);
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < deadline) {
    int status = 0;
    if (waitpid(pid_, &status, WNOHANG) == pid_) {
      pid_ = -1;
      if (WIFEXITED(status)) return WEXITSTATUS(status);
      if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
      return -1;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return -1;
}

std::string NormdProcess::Log() const { return ReadFile(dir_ + "/normd.log"); }

std::unique_ptr<grpc::ClientContext> Ctx(std::chrono::milliseconds timeout) {
  auto ctx = std::make_unique<grpc::ClientContext>();
  ctx->set_deadline(std::chrono::system_clock::now() + timeout);
  return ctx;
}

v1::ModelSpec MlpSpec(int in, int hidden, int out, uint64_t seed, float lr) {
  v1::ModelSpec spec;
  spec.add_input_shape(in);
  auto* l0 = spec.add_layers()->mutable_linear();
  l0->set_in_features(in);
  l0->set_out_features(hidden);
  v1::LayerSpec* bn = spec.add_layers();
  bn->set_name("bn1");
  bn->mutable_batch_norm1d()->set_num_features(hidden);
  spec.add_layers()->mutable_relu();
  auto* l3 = spec.add_layers()->mutable_linear();
  l3->set_in_features(hidden);
  l3->set_out_features(out);
  spec.set_loss(v1::LOSS_CROSS_ENTROPY);
  spec.mutable_optimizer()->mutable_sgd()->set_lr(lr);
  spec.mutable_optimizer()->mutable_sgd()->set_momentum(0.9f);
  spec.set_seed(seed);
  return spec;
}

std::vector<float> RandomValues(size_t n, uint64_t seed, float scale, float shift) {
  std::vector<float> v(n);
  uint64_t s = seed * 0x2545f4914f6cdd1dULL + 1;
  for (float& x : v) {
    const float u = static_cast<float>(SplitMix(&s) >> 40) / static_cast<float>(1 << 24);
    x = (2.0f * u - 1.0f) * scale + shift;
  }
  return v;
}

std::vector<int64_t> RandomLabels(size_t n, int classes, uint64_t seed) {
  std::vector<int64_t> v(n);
  uint64_t s = seed * 0x9e3779b97f4a7c15ULL + 7;
  for (int64_t& x : v) x = static_cast<int64_t>(SplitMix(&s) % classes);
  return v;
}

v1::Tensor MakeTensor(const std::vector<int64_t>& shape, const std::vector<float>& values,
                      bool raw) {
  v1::Tensor t;
  for (int64_t d : shape) t.add_shape(d);
  if (raw) {
    t.set_raw(std::string(reinterpret_cast<const char*>(values.data()),
                          values.size() * sizeof(float)));
  } else {
    *t.mutable_values() = {values.begin(), values.end()};
  }
  return t;
}

std::vector<float> Values(const v1::Tensor& t) {
  if (!t.raw().empty()) {
    std::vector<float> v(t.raw().size() / sizeof(float));
    std::memcpy(v.data(), t.raw().data(), v.size() * sizeof(float));
    return v;
  }
  return std::vector<float>(t.values().begin(), t.values().end());
}

std::map<std::string, std::vector<float>> StateMap(const v1::ModelState& state) {
  std::map<std::string, std::vector<float>> m;
  for (const v1::NamedTensor& nt : state.tensors()) m[nt.name()] = Values(nt.tensor());
  return m;
}

bool BitEqual(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

std::string HttpGet(int port, const std::string& path) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return "";
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  timeval tv{10, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    close(fd);
    return "";
  }
  // HTTP/1.0: the body is not chunked and the server closes the connection at its end.
  const std::string req = "GET " + path + " HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n";
  if (send(fd, req.data(), req.size(), 0) != static_cast<ssize_t>(req.size())) {
    close(fd);
    return "";
  }
  std::string resp;
  char buf[65536];
  for (ssize_t n; (n = recv(fd, buf, sizeof(buf), 0)) > 0;) resp.append(buf, n);
  close(fd);
  const size_t body = resp.find("\r\n\r\n");
  if (resp.rfind("HTTP/1.", 0) != 0 || resp.find(" 200 ") > resp.find("\r\n") ||
      body == std::string::npos) {
    return "";
  }
  return resp.substr(body + 4);
}

double MetricValue(const std::string& exposition, const std::string& name,
                   const std::vector<std::string>& labels) {
  std::istringstream in(exposition);
  for (std::string line; std::getline(in, line);) {
    if (line.empty() || line[0] == '#') continue;
    if (line.compare(0, name.size(), name) != 0) continue;
    const char next = line.size() > name.size() ? line[name.size()] : '\0';
    if (next != '{' && next != ' ') continue;  // a longer name sharing the prefix
    const size_t space = line.rfind(' ');
    const std::string series = line.substr(0, space);
    bool all = true;
    for (const std::string& l : labels) all = all && series.find(l) != std::string::npos;
    if (all) return std::stod(line.substr(space + 1));
  }
  return std::numeric_limits<double>::quiet_NaN();
}

}  // namespace normd::testing
