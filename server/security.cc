#include "server/security.h"

#include <google/protobuf/descriptor.h>
#include <openssl/bio.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <unistd.h>

#include <cassert>
#include <cctype>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>
#include <unordered_map>

namespace normd::server {
namespace {

constexpr char kTrainerService[] = "normd.v1.Trainer";

Status ReadFile(const std::string& path, const char* flag, std::string* out) {
  if (access(path.c_str(), R_OK) != 0) {
    return InvalidArgument(flag, " '", path, "' does not exist or is not readable by this user: ",
                           std::strerror(errno));
  }
  std::ifstream in(path, std::ios::binary);
  std::ostringstream text;
  text << in.rdbuf();
  if (!in.good() && !in.eof()) return InvalidArgument(flag, " '", path, "' cannot be read");
  *out = text.str();
  return Status::Ok();
}

// Owners for OpenSSL objects, so every return path frees them.
struct BioFree {
  void operator()(BIO* b) const { BIO_free(b); }
};
struct X509Free {
  void operator()(X509* x) const { X509_free(x); }
};
struct KeyFree {
  void operator()(EVP_PKEY* k) const { EVP_PKEY_free(k); }
};
using BioPtr = std::unique_ptr<BIO, BioFree>;
using X509Ptr = std::unique_ptr<X509, X509Free>;
using KeyPtr = std::unique_ptr<EVP_PKEY, KeyFree>;

BioPtr MemoryBio(const std::string& pem) {
  return BioPtr(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
}

// The PEM certificates in `pem`, in order.
std::vector<X509Ptr> Certificates(const std::string& pem) {
  std::vector<X509Ptr> certs;
  BioPtr bio = MemoryBio(pem);
  while (X509* x = PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr)) certs.emplace_back(x);
  return certs;
}

// The server's certificate chain and key: both parse, and the first certificate is the key's.
Status CheckCertificateAndKey(const SecurityFlags& f) {
  std::string cert_pem, key_pem;
  NORMD_RETURN_IF_ERROR(ReadFile(f.tls_cert, "--tls-cert", &cert_pem));
  NORMD_RETURN_IF_ERROR(ReadFile(f.tls_key, "--tls-key", &key_pem));
  std::vector<X509Ptr> chain = Certificates(cert_pem);
  if (chain.empty()) {
    return InvalidArgument("--tls-cert '", f.tls_cert, "' holds no PEM certificate");
  }
  BioPtr key_bio = MemoryBio(key_pem);
  KeyPtr key(PEM_read_bio_PrivateKey(key_bio.get(), nullptr, nullptr, nullptr));
  if (key == nullptr) {
    return InvalidArgument("--tls-key '", f.tls_key,
                           "' holds no unencrypted PEM private key (normd cannot ask for a "
                           "passphrase)");
  }
  if (X509_check_private_key(chain.front().get(), key.get()) != 1) {
    return InvalidArgument("--tls-key '", f.tls_key, "' is not the private key of the first "
                           "certificate in --tls-cert '", f.tls_cert, "'");
  }
  return Status::Ok();
}

bool IsSpace(char c) { return c == ' ' || c == '\t' || c == '\r'; }

std::string_view Trim(std::string_view s) {
  while (!s.empty() && IsSpace(s.front())) s.remove_prefix(1);
  while (!s.empty() && IsSpace(s.back())) s.remove_suffix(1);
  return s;
}

bool StartsWithNoCase(std::string_view s, std::string_view prefix) {
  if (s.size() < prefix.size()) return false;
  for (size_t i = 0; i < prefix.size(); ++i) {
    if (std::tolower(static_cast<unsigned char>(s[i])) != prefix[i]) return false;
  }
  return true;
}

// Turns the callback layer's refusal of an undecodable request into INVALID_ARGUMENT.
//
// gRPC 1.51's callback handlers (grpcpp/impl/codegen/server_callback_handlers.h) finish a call
// with UNIMPLEMENTED and an empty message when the request does not deserialize, or when the
// method handler returns no reactor. normd's Trainer handlers always return a reactor and never
// finish with UNIMPLEMENTED (server/status_map.cc maps no normd error to it), so on a registered
// Trainer method that exact pair can only mean the request bytes did not parse. A method the
// server does not know never reaches this interceptor with a Trainer method name from the
// table, so its UNIMPLEMENTED is left alone.
class UndecodableRequestInterceptor : public grpc::experimental::Interceptor {
 public:
  UndecodableRequestInterceptor(grpc::experimental::ServerRpcInfo* info,
                                const std::string* request_type, const TokenAuthenticator* auth)
      : info_(info), request_type_(request_type), auth_(auth) {}

  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    using grpc::experimental::InterceptionHookPoints;
    if (methods->QueryInterceptionHookPoint(InterceptionHookPoints::PRE_SEND_STATUS)) {
      const grpc::Status status = methods->GetSendStatus();
      if (status.error_code() == grpc::StatusCode::UNIMPLEMENTED &&
          status.error_message().empty()) {
        grpc::Status refused = auth_ != nullptr
                                   ? auth_->Check(info_->server_context()->client_metadata())
                                   : grpc::Status::OK;
        methods->ModifySendStatus(
            !refused.ok() ? refused
                          : grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                                         StrCat("request does not parse as ", *request_type_,
                                                " (malformed protobuf bytes, or a message of "
                                                "another type)")));
      }
    }
    methods->Proceed();
  }

 private:
  grpc::experimental::ServerRpcInfo* const info_;
  const std::string* const request_type_;  // owned by the factory
  const TokenAuthenticator* const auth_;
};

class UndecodableRequestInterceptorFactory
    : public grpc::experimental::ServerInterceptorFactoryInterface {
 public:
  explicit UndecodableRequestInterceptorFactory(const TokenAuthenticator* auth) : auth_(auth) {
    const google::protobuf::ServiceDescriptor* service =
        google::protobuf::DescriptorPool::generated_pool()->FindServiceByName(kTrainerService);
    assert(service != nullptr && "normd.v1.Trainer is linked into normd_server");
    for (int i = 0; i < service->method_count(); ++i) {
      const google::protobuf::MethodDescriptor* m = service->method(i);
      if (m->client_streaming()) continue;  // see the header
      request_types_.emplace(StrCat("/", kTrainerService, "/", m->name()),
                             m->input_type()->full_name());
    }
  }

  grpc::experimental::Interceptor* CreateServerInterceptor(
      grpc::experimental::ServerRpcInfo* info) override {
    auto it = request_types_.find(info->method());
    if (it == request_types_.end()) return nullptr;  // health, reflection, unknown methods
    return new UndecodableRequestInterceptor(info, &it->second, auth_);
  }

 private:
  const TokenAuthenticator* const auth_;
  std::unordered_map<std::string, std::string> request_types_;  // method path -> request type
};

}  // namespace

Status ValidateSecurityFlags(const SecurityFlags& f) {
  const bool cert = !f.tls_cert.empty();
  const bool key = !f.tls_key.empty();
  if (cert != key) {
    return InvalidArgument(cert ? "--tls-cert needs --tls-key (the certificate's private key)"
                                : "--tls-key needs --tls-cert (the certificate it belongs to)");
  }
  if (!f.tls_client_ca.empty() && !cert) {
    return InvalidArgument("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key: client "
                           "certificates are only asked for over TLS");
  }
  if (cert) NORMD_RETURN_IF_ERROR(CheckCertificateAndKey(f));
  if (!f.tls_client_ca.empty()) {
    std::string pem;
    NORMD_RETURN_IF_ERROR(ReadFile(f.tls_client_ca, "--tls-client-ca", &pem));
    if (Certificates(pem).empty()) {
      return InvalidArgument("--tls-client-ca '", f.tls_client_ca, "' holds no PEM certificate");
    }
  }
  if (!f.auth_token_file.empty()) {
    std::unique_ptr<TokenAuthenticator> unused;
    NORMD_RETURN_IF_ERROR(LoadTokenAuthenticator(f, &unused));
  }
  return Status::Ok();
}

std::string DescribeSecurity(const SecurityFlags& f) {
  std::ostringstream os;
  if (f.tls_cert.empty()) {
    os << "tls=off (plaintext)\n";
  } else {
    os << "tls=on cert=" << f.tls_cert << " key=" << f.tls_key << "\n";
  }
  os << "mtls="
     << (f.tls_client_ca.empty() ? std::string("off")
                                 : "on (client certificates required, CA " + f.tls_client_ca + ")")
     << "\n";
  if (f.auth_token_file.empty()) {
    os << "auth=off\n";
  } else {
    std::unique_ptr<TokenAuthenticator> auth;
    const Status s = LoadTokenAuthenticator(f, &auth);
    os << "auth=bearer token_file=" << f.auth_token_file << " tokens="
       << (s.ok() ? std::to_string(auth->size()) : "?") << "\n";
  }
  os << "reflection=" << (f.auth_token_file.empty() ? "on" : "off (auth is on)") << "\n";
  return os.str();
}

Status ParseTokenFile(std::string_view text, std::vector<std::string>* tokens) {
  tokens->clear();
  int line_number = 0;
  while (!text.empty()) {
    const size_t end = text.find('\n');
    std::string_view line = Trim(text.substr(0, end));
    text.remove_prefix(end == std::string_view::npos ? text.size() : end + 1);
    ++line_number;
    if (line.empty()) continue;
    if (line.size() > kMaxTokenBytes) {
      return InvalidArgument("line ", line_number, " holds a token of ", line.size(),
                             " bytes; at most ", kMaxTokenBytes, " are accepted");
    }
    for (char c : line) {
      if (c < 0x20 || c > 0x7e) {
        return InvalidArgument("line ", line_number, " holds a character that gRPC metadata "
                               "cannot carry (tokens are printable ASCII)");
      }
    }
    tokens->emplace_back(line);
  }
  if (tokens->empty()) return InvalidArgument("it holds no token (one token per line)");
  return Status::Ok();
}

TokenAuthenticator::TokenAuthenticator(const std::vector<std::string>& tokens) {
  assert(!tokens.empty());
  for (const std::string& t : tokens) {
    assert(!t.empty() && t.size() <= kMaxTokenBytes);
    Padded p;
    std::memcpy(p.bytes.data(), t.data(), t.size());
    p.length = t.size();
    tokens_.push_back(p);
  }
}

bool TokenAuthenticator::Accepts(std::string_view token) const {
  // Only the presented token's own length (which its sender knows) decides this early exit.
  if (token.empty() || token.size() > kMaxTokenBytes) return false;
  Padded presented;
  std::memcpy(presented.bytes.data(), token.data(), token.size());
  presented.length = token.size();
  unsigned match = 0;
  for (const Padded& accepted : tokens_) {
    // Every byte of the padded buffers is compared: the loop's length is fixed, no branch
    // depends on the secret, and the lengths are compared the same way.
    size_t diff = accepted.length ^ presented.length;
    for (size_t i = 0; i < kMaxTokenBytes; ++i) diff |= accepted.bytes[i] ^ presented.bytes[i];
    // 1 when diff == 0, without a data-dependent branch.
    match |= static_cast<unsigned>(1 & ((diff - 1) >> (sizeof(diff) * 8 - 1)));
  }
  // The volatile read keeps the compiler from turning the accumulation into an early exit.
  volatile unsigned result = match;
  return result == 1;
}

grpc::Status TokenAuthenticator::Check(
    const std::multimap<grpc::string_ref, grpc::string_ref>& metadata) const {
  auto range = metadata.equal_range("authorization");
  if (range.first == range.second) {
    return grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                        "missing bearer token: send metadata 'authorization: Bearer <token>'");
  }
  const grpc::Status invalid(grpc::StatusCode::UNAUTHENTICATED, "invalid bearer token");
  if (std::next(range.first) != range.second) return invalid;  // one credential per call
  const std::string_view value(range.first->second.data(), range.first->second.size());
  constexpr std::string_view kScheme = "bearer ";
  if (!StartsWithNoCase(value, kScheme)) return invalid;
  return Accepts(Trim(value.substr(kScheme.size()))) ? grpc::Status::OK : invalid;
}

Status LoadTokenAuthenticator(const SecurityFlags& f,
                              std::unique_ptr<TokenAuthenticator>* authenticator) {
  std::string text;
  NORMD_RETURN_IF_ERROR(ReadFile(f.auth_token_file, "--auth-token-file", &text));
  std::vector<std::string> tokens;
  Status s = ParseTokenFile(text, &tokens);
  if (!s.ok()) return s.WithPrefix(StrCat("--auth-token-file '", f.auth_token_file, "'"));
  *authenticator = std::make_unique<TokenAuthenticator>(tokens);
  return Status::Ok();
}

Status LoadServerCredentials(const SecurityFlags& f,
                             std::shared_ptr<grpc::ServerCredentials>* credentials) {
  credentials->reset();
  if (f.tls_cert.empty()) return Status::Ok();
  grpc::SslServerCredentialsOptions ssl;
  grpc::SslServerCredentialsOptions::PemKeyCertPair pair;
  NORMD_RETURN_IF_ERROR(ReadFile(f.tls_cert, "--tls-cert", &pair.cert_chain));
  NORMD_RETURN_IF_ERROR(ReadFile(f.tls_key, "--tls-key", &pair.private_key));
  ssl.pem_key_cert_pairs.push_back(std::move(pair));
  if (!f.tls_client_ca.empty()) {
    NORMD_RETURN_IF_ERROR(ReadFile(f.tls_client_ca, "--tls-client-ca", &ssl.pem_root_certs));
    ssl.client_certificate_request = GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY;
  }
  *credentials = grpc::SslServerCredentials(ssl);
  return Status::Ok();
}

std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>
MakeUndecodableRequestInterceptorFactory(const TokenAuthenticator* auth) {
  return std::make_unique<UndecodableRequestInterceptorFactory>(auth);
}

}  // namespace normd::server
