#include "server/security.h"

#include <google/protobuf/descriptor.h>
#include <grpc/grpc_security_constants.h>
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
#include <functional>
#include <set>
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
                                const std::string* request_type, const Authenticator* auth)
      : info_(info), request_type_(request_type), auth_(auth) {}

  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    using grpc::experimental::InterceptionHookPoints;
    if (methods->QueryInterceptionHookPoint(InterceptionHookPoints::PRE_SEND_STATUS)) {
      const grpc::Status status = methods->GetSendStatus();
      if (status.error_code() == grpc::StatusCode::UNIMPLEMENTED &&
          status.error_message().empty()) {
        Principal unused;
        grpc::Status refused = auth_ != nullptr
                                   ? auth_->Identify(*info_->server_context(), &unused)
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
  const Authenticator* const auth_;
};

class UndecodableRequestInterceptorFactory
    : public grpc::experimental::ServerInterceptorFactoryInterface {
 public:
  explicit UndecodableRequestInterceptorFactory(const Authenticator* auth) : auth_(auth) {
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
  const Authenticator* const auth_;
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
  if (!f.tls_client_tenants.empty() && f.tls_client_ca.empty()) {
    return InvalidArgument("--tls-client-tenants needs --tls-client-ca (mutual TLS): tenants are "
                           "read from verified client certificates");
  }
  std::unique_ptr<Authenticator> unused;
  return LoadAuthenticator(f, &unused);
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
  // The files as the server would load them; "?" where they do not load (ValidateSecurity
  // says why).
  std::unique_ptr<Authenticator> auth;
  const bool loaded = LoadAuthenticator(f, &auth).ok();
  if (f.auth_token_file.empty()) {
    os << "auth=off\n";
  } else {
    os << "auth=bearer token_file=" << f.auth_token_file << " tokens="
       << (loaded ? std::to_string(auth->token_count()) : "?") << "\n";
  }
  const std::set<std::string> tenants = loaded && auth != nullptr ? auth->tenants()
                                                                  : std::set<std::string>();
  os << "tenants=";
  if (!loaded) {
    os << "?";
  } else if (tenants.empty()) {
    os << kDefaultTenant << " (every call)";
  } else {
    std::string sep;
    for (const std::string& t : tenants) {
      os << sep << t;
      sep = ",";
    }
  }
  os << "\n";
  os << "client_tenants="
     << (f.tls_client_tenants.empty()
             ? std::string("off")
             : f.tls_client_tenants + " mappings=" +
                   (loaded ? std::to_string(auth->certificate_count()) : "?"))
     << "\n";
  os << "reflection=" << (f.auth_token_file.empty() ? "on" : "off (auth is on)") << "\n";
  return os.str();
}

namespace {

// Splits a line into fields separated by spaces or tabs.
std::vector<std::string_view> Fields(std::string_view line) {
  std::vector<std::string_view> out;
  size_t i = 0;
  while (i < line.size()) {
    while (i < line.size() && IsSpace(line[i])) ++i;
    size_t j = i;
    while (j < line.size() && !IsSpace(line[j])) ++j;
    if (j > i) out.push_back(line.substr(i, j - i));
    i = j;
  }
  return out;
}

// Calls `each(line_number, fields)` for every non-empty line of `text` that is not a comment
// (a '#' first) when `comments`; stops at the first error.
Status ForEachLine(std::string_view text, bool comments,
                   const std::function<Status(int, std::string_view)>& each) {
  int line_number = 0;
  while (!text.empty()) {
    const size_t end = text.find('\n');
    std::string_view line = Trim(text.substr(0, end));
    text.remove_prefix(end == std::string_view::npos ? text.size() : end + 1);
    ++line_number;
    if (line.empty() || (comments && line.front() == '#')) continue;
    NORMD_RETURN_IF_ERROR(each(line_number, line));
  }
  return Status::Ok();
}

// The TENANT [admin] fields of a token or certificate line; `first` indexes TENANT.
Status ParsePrincipal(const std::vector<std::string_view>& fields, size_t first, int line_number,
                      Principal* who) {
  if (fields.size() > first + 2) {
    return InvalidArgument("line ", line_number, " has ", fields.size(), " fields; expected at most ",
                           first + 2, " (", first == 1 ? "TOKEN" : "IDENTITY",
                           " [TENANT [admin]])");
  }
  if (fields.size() <= first) return Status::Ok();  // the default tenant, admin
  NORMD_RETURN_IF_ERROR(
      ValidateTenantName(fields[first], StrCat("the tenant on line ", line_number)));
  who->tenant = std::string(fields[first]);
  who->admin = false;
  if (fields.size() == first + 2) {
    if (fields[first + 1] != "admin") {
      return InvalidArgument("line ", line_number, ": the field after the tenant must be "
                             "'admin' or nothing, got '", fields[first + 1], "'");
    }
    who->admin = true;
  }
  return Status::Ok();
}

}  // namespace

Status ParseTokenFile(std::string_view text, std::vector<TokenGrant>* grants) {
  grants->clear();
  Status s = ForEachLine(text, /*comments=*/false, [&](int n, std::string_view line) {
    for (char c : line) {
      if (c < 0x20 || c > 0x7e) {
        if (c == '\t') continue;
        return InvalidArgument("line ", n, " holds a character that gRPC metadata "
                               "cannot carry (tokens are printable ASCII)");
      }
    }
    const std::vector<std::string_view> fields = Fields(line);
    TokenGrant g;
    if (fields[0].size() > kMaxTokenBytes) {
      return InvalidArgument("line ", n, " holds a token of ", fields[0].size(),
                             " bytes; at most ", kMaxTokenBytes, " are accepted");
    }
    g.token = std::string(fields[0]);
    NORMD_RETURN_IF_ERROR(ParsePrincipal(fields, 1, n, &g.principal));
    for (size_t i = 0; i < grants->size(); ++i) {
      if ((*grants)[i].token == g.token) {
        return InvalidArgument("line ", n, " repeats the token of an earlier line (each token "
                               "names one tenant)");
      }
    }
    grants->push_back(std::move(g));
    return Status::Ok();
  });
  if (!s.ok()) return s;
  if (grants->empty()) return InvalidArgument("it holds no token (one token per line)");
  return Status::Ok();
}

TokenAuthenticator::TokenAuthenticator(const std::vector<TokenGrant>& grants) {
  assert(!grants.empty());
  for (const TokenGrant& g : grants) {
    assert(!g.token.empty() && g.token.size() <= kMaxTokenBytes);
    Padded p;
    std::memcpy(p.bytes.data(), g.token.data(), g.token.size());
    p.length = g.token.size();
    tokens_.push_back(p);
    principals_.push_back(g.principal);
  }
}

int TokenAuthenticator::Match(std::string_view token) const {
  // Only the presented token's own length (which its sender knows) decides this early exit.
  if (token.empty() || token.size() > kMaxTokenBytes) return -1;
  Padded presented;
  std::memcpy(presented.bytes.data(), token.data(), token.size());
  presented.length = token.size();
  size_t found = 0;  // index + 1 of the matching token; tokens are distinct, so at most one
  for (size_t t = 0; t < tokens_.size(); ++t) {
    const Padded& accepted = tokens_[t];
    // Every byte of the padded buffers is compared: the loop's length is fixed, no branch
    // depends on the secret, and the lengths are compared the same way.
    size_t diff = accepted.length ^ presented.length;
    for (size_t i = 0; i < kMaxTokenBytes; ++i) diff |= accepted.bytes[i] ^ presented.bytes[i];
    // All ones when diff == 0, zero otherwise, without a data-dependent branch.
    const size_t equal = 0 - (1 & ((diff - 1) >> (sizeof(diff) * 8 - 1)));
    found |= (t + 1) & equal;
  }
  // The volatile read keeps the compiler from turning the accumulation into an early exit.
  volatile size_t result = found;
  return static_cast<int>(result) - 1;
}

bool TokenAuthenticator::Presented(
    const std::multimap<grpc::string_ref, grpc::string_ref>& metadata) {
  return metadata.find("authorization") != metadata.end();
}

grpc::Status TokenAuthenticator::Check(
    const std::multimap<grpc::string_ref, grpc::string_ref>& metadata, Principal* who) const {
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
  const int index = Match(Trim(value.substr(kScheme.size())));
  if (index < 0) return invalid;
  *who = principals_[index];
  return grpc::Status::OK;
}

Status ParseClientTenantsFile(std::string_view text, std::vector<CertificateGrant>* grants) {
  grants->clear();
  Status s = ForEachLine(text, /*comments=*/true, [&](int n, std::string_view line) {
    const std::vector<std::string_view> fields = Fields(line);
    CertificateGrant g;
    const std::string_view id = fields[0];
    if (id.substr(0, 3) == "CN=") {
      g.field = CertificateGrant::Field::kCommonName;
      g.value = std::string(id.substr(3));
    } else if (id.substr(0, 4) == "SAN=") {
      g.field = CertificateGrant::Field::kSubjectAltName;
      g.value = std::string(id.substr(4));
    } else {
      return InvalidArgument("line ", n, " must start with CN=<common name> or "
                             "SAN=<subject alternative name>, got '", id, "'");
    }
    if (g.value.empty()) return InvalidArgument("line ", n, ": the identity after '=' is empty");
    if (fields.size() < 2) {
      return InvalidArgument("line ", n, " names no tenant (IDENTITY TENANT [admin])");
    }
    NORMD_RETURN_IF_ERROR(ParsePrincipal(fields, 1, n, &g.principal));
    for (const CertificateGrant& other : *grants) {
      if (other.field == g.field && other.value == g.value) {
        return InvalidArgument("line ", n, " maps '", id, "' a second time");
      }
    }
    grants->push_back(std::move(g));
    return Status::Ok();
  });
  if (!s.ok()) return s;
  if (grants->empty()) return InvalidArgument("it holds no mapping (CN=... TENANT [admin])");
  return Status::Ok();
}

Authenticator::Authenticator(std::unique_ptr<TokenAuthenticator> tokens,
                             std::vector<CertificateGrant> certificates)
    : tokens_(std::move(tokens)), certificates_(std::move(certificates)) {}

std::set<std::string> Authenticator::tenants() const {
  std::set<std::string> out;
  if (tokens_ != nullptr) {
    for (const Principal& p : tokens_->principals()) out.insert(p.tenant);
  }
  for (const CertificateGrant& g : certificates_) out.insert(g.principal.tenant);
  return out;
}

bool Authenticator::FromCertificate(const grpc::ServerContextBase& ctx, Principal* who,
                                    std::string* seen) const {
  std::shared_ptr<const grpc::AuthContext> auth = ctx.auth_context();
  if (auth == nullptr || !auth->IsPeerAuthenticated()) return false;
  const std::vector<grpc::string_ref> cns = auth->FindPropertyValues(GRPC_X509_CN_PROPERTY_NAME);
  const std::vector<grpc::string_ref> sans =
      auth->FindPropertyValues(GRPC_X509_SAN_PROPERTY_NAME);
  for (const CertificateGrant& g : certificates_) {
    const bool cn = g.field == CertificateGrant::Field::kCommonName;
    for (const grpc::string_ref& v : cn ? cns : sans) {
      if (std::string_view(v.data(), v.size()) == g.value) {
        *who = g.principal;
        *seen = StrCat(cn ? "CN=" : "SAN=", g.value);
        return true;
      }
    }
  }
  if (!cns.empty()) *seen = StrCat("CN=", std::string(cns[0].data(), cns[0].size()));
  return false;
}

grpc::Status Authenticator::Identify(const grpc::ServerContextBase& ctx, Principal* who) const {
  Principal from_cert;
  std::string cert_seen = "a certificate without a common name";
  const bool mapped = certificates_on() && FromCertificate(ctx, &from_cert, &cert_seen);
  if (tokens_ != nullptr && (!mapped || TokenAuthenticator::Presented(ctx.client_metadata()))) {
    Principal from_token;
    grpc::Status s = tokens_->Check(ctx.client_metadata(), &from_token);
    if (!s.ok()) return s;
    if (mapped && from_token.tenant != from_cert.tenant) {
      return grpc::Status(grpc::StatusCode::PERMISSION_DENIED,
                          StrCat("the bearer token's tenant '", from_token.tenant,
                                 "' differs from the client certificate's (", cert_seen,
                                 ") tenant '", from_cert.tenant, "'"));
    }
    if (mapped) from_token.admin = from_token.admin || from_cert.admin;
    *who = std::move(from_token);
    return grpc::Status::OK;
  }
  if (mapped) {
    *who = std::move(from_cert);
    return grpc::Status::OK;
  }
  if (certificates_on()) {
    return grpc::Status(grpc::StatusCode::PERMISSION_DENIED,
                        StrCat("the client certificate (", cert_seen,
                               ") maps to no tenant (--tls-client-tenants)"));
  }
  *who = Principal();
  return grpc::Status::OK;
}

Status LoadAuthenticator(const SecurityFlags& f, std::unique_ptr<Authenticator>* out) {
  out->reset();
  std::unique_ptr<TokenAuthenticator> tokens;
  if (!f.auth_token_file.empty()) {
    std::string text;
    NORMD_RETURN_IF_ERROR(ReadFile(f.auth_token_file, "--auth-token-file", &text));
    std::vector<TokenGrant> grants;
    Status s = ParseTokenFile(text, &grants);
    if (!s.ok()) return s.WithPrefix(StrCat("--auth-token-file '", f.auth_token_file, "'"));
    tokens = std::make_unique<TokenAuthenticator>(grants);
  }
  std::vector<CertificateGrant> certificates;
  if (!f.tls_client_tenants.empty()) {
    std::string text;
    NORMD_RETURN_IF_ERROR(ReadFile(f.tls_client_tenants, "--tls-client-tenants", &text));
    Status s = ParseClientTenantsFile(text, &certificates);
    if (!s.ok()) {
      return s.WithPrefix(StrCat("--tls-client-tenants '", f.tls_client_tenants, "'"));
    }
  }
  if (tokens != nullptr || !certificates.empty()) {
    *out = std::make_unique<Authenticator>(std::move(tokens), std::move(certificates));
  }
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
MakeUndecodableRequestInterceptorFactory(const Authenticator* auth) {
  return std::make_unique<UndecodableRequestInterceptorFactory>(auth);
}

}  // namespace normd::server
