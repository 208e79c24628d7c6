// Who may talk to normd: TLS and mutual-TLS server credentials from PEM files, the identity of
// a Trainer call (bearer token and/or client certificate -> tenant, server/tenant.h), and the
// interceptor that turns gRPC's answer to an undecodable request into INVALID_ARGUMENT.
//
// Identities are checked where a Trainer call is admitted (TrainerService, before anything
// else runs), not by a gRPC server interceptor: gRPC 1.51's server interceptors cannot refuse a
// call, and an AuthMetadataProcessor only attaches to TLS credentials, while tokens must also
// work on plaintext listeners. grpc.health.v1.Health is not checked: probes carry no token.
// Reflection would be an unauthenticated service, so it is not served while tokens are on.
#ifndef NORMD_SERVER_SECURITY_H_
#define NORMD_SERVER_SECURITY_H_

#include <grpcpp/grpcpp.h>
#include <grpcpp/support/server_interceptor.h>

#include <array>
#include <cstddef>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include "core/status.h"
#include "server/tenant.h"

namespace normd::server {

// The security flags; an empty path leaves that feature off.
struct SecurityFlags {
  std::string tls_cert;         // PEM server certificate chain (--tls-cert)
  std::string tls_key;          // PEM private key of that certificate (--tls-key)
  std::string tls_client_ca;    // PEM CA bundle client certificates must chain to (--tls-client-ca)
  std::string auth_token_file;  // accepted bearer tokens, one per line (--auth-token-file)
  std::string tls_client_tenants;  // client certificate -> tenant mapping (--tls-client-tenants)
};

// Checks the combination (--tls-cert and --tls-key together; --tls-client-ca needs both;
// --tls-client-tenants needs --tls-client-ca) and that every named file is readable and holds
// what it should: a certificate whose public key matches the private key, at least one CA
// certificate, at least one valid token line, at least one valid certificate mapping. INVALID_ARGUMENT naming the
// flag. Never puts a key or token in a message.
Status ValidateSecurityFlags(const SecurityFlags& flags);

// One "name=value" line per feature for --check-config and the start-up log (paths and counts,
// never secrets). REQUIRES: ValidateSecurityFlags(flags) is OK.
std::string DescribeSecurity(const SecurityFlags& flags);

// Longest bearer token accepted, in bytes. Every comparison costs the same for tokens up to this
// size; a presented token longer than this is refused without comparing.
constexpr size_t kMaxTokenBytes = 512;

// One line of a token file: an accepted token and whom it identifies.
struct TokenGrant {
  std::string token;
  Principal principal;
};

// Parses a token file: one grant per non-empty line, "TOKEN [TENANT [admin]]", fields separated
// by spaces or tabs, surrounding spaces, tabs and CR trimmed. A bare token is tenant "default"
// and admin (the meaning every token had before tenants, so old files work unchanged); "TOKEN
// TENANT" is that tenant's ordinary member, "TOKEN TENANT admin" its admin. INVALID_ARGUMENT
// naming the line when no token is left, when a token is longer than kMaxTokenBytes or contains
// a character a gRPC metadata value cannot carry (outside printable ASCII), when the tenant is
// not a valid tenant name (server/tenant.h), when the third field is not "admin", when there
// are more fields, or when a token repeats an earlier line's.
// Several lines let tokens rotate: add the new one, move clients over, remove the old one.
Status ParseTokenFile(std::string_view text, std::vector<TokenGrant>* grants);

// Accepts the calls whose metadata carries `authorization: Bearer <token>` for one of its tokens,
// and tells whom the token identifies. Immutable after construction, so thread-safe.
class TokenAuthenticator {
 public:
  // REQUIRES: grants is not empty; each token has 1 to kMaxTokenBytes bytes.
  explicit TokenAuthenticator(const std::vector<TokenGrant>& grants);

  // OK with *who set to the token's principal, or UNAUTHENTICATED: "missing bearer token ..."
  // when the call carries no authorization metadata, "invalid bearer token" when it carries
  // anything but an accepted token.
  grpc::Status Check(const std::multimap<grpc::string_ref, grpc::string_ref>& metadata,
                     Principal* who) const;

  // Whether the call carries authorization metadata at all (valid or not).
  static bool Presented(const std::multimap<grpc::string_ref, grpc::string_ref>& metadata);

  // The index of the grant whose token equals `token`, or -1. Compares `token` with every
  // accepted token, each comparison over kMaxTokenBytes bytes with no early exit, so the time
  // taken tells neither where a guess first differs nor how long the accepted tokens are.
  int Match(std::string_view token) const;
  bool Accepts(std::string_view token) const { return Match(token) >= 0; }

  size_t size() const { return tokens_.size(); }
  // Whom the tokens identify, in file order.
  const std::vector<Principal>& principals() const { return principals_; }

 private:
  struct Padded {
    std::array<unsigned char, kMaxTokenBytes> bytes{};  // the token, then zeros
    size_t length = 0;
  };
  std::vector<Padded> tokens_;
  std::vector<Principal> principals_;  // principals_[i]: whom tokens_[i] identifies
};

// One line of a --tls-client-tenants file: a client certificate identity and its tenant.
struct CertificateGrant {
  enum class Field { kCommonName, kSubjectAltName };
  Field field = Field::kCommonName;
  std::string value;  // compared exactly
  Principal principal;
};

// Parses a --tls-client-tenants file: one mapping per non-empty line, "CN=<common name> TENANT
// [admin]" or "SAN=<subject alternative name> TENANT [admin]" ("SAN=" matches any DNS, URI,
// e-mail or IP entry of the certificate's subjectAltName, as gRPC reports them); '#' starts a
// comment line. Identities hold no spaces. INVALID_ARGUMENT naming the line on a bad prefix,
// tenant or flag, or an identity listed twice; when no mapping is left.
Status ParseClientTenantsFile(std::string_view text, std::vector<CertificateGrant>* grants);

// Who a Trainer call is (server/tenant.h), from its bearer token, its client certificate
// (mutual TLS with --tls-client-tenants), both, or neither:
//  - a mapped client certificate names the tenant by itself; a token presented beside it must
//    be valid and name the same tenant (PERMISSION_DENIED otherwise); either may grant admin;
//  - with tokens on and no mapped certificate, the call needs an accepted token
//    (UNAUTHENTICATED otherwise);
//  - with only the certificate mapping on, an unmapped certificate is PERMISSION_DENIED;
//  - with neither feature, every call is tenant "default", admin.
// Immutable after construction, so thread-safe.
class Authenticator {
 public:
  // Either may be null.
  Authenticator(std::unique_ptr<TokenAuthenticator> tokens,
                std::vector<CertificateGrant> certificates);

  grpc::Status Identify(const grpc::ServerContextBase& ctx, Principal* who) const;

  bool tokens_on() const { return tokens_ != nullptr; }
  size_t token_count() const { return tokens_ != nullptr ? tokens_->size() : 0; }
  bool certificates_on() const { return !certificates_.empty(); }
  size_t certificate_count() const { return certificates_.size(); }
  // Every tenant a token or a certificate mapping names, sorted (tenant names are not secrets).
  std::set<std::string> tenants() const;

 private:
  // The principal of the call's mapped certificate, with a description of the certificate for
  // messages ("CN=alice"); false when none maps.
  bool FromCertificate(const grpc::ServerContextBase& ctx, Principal* who,
                       std::string* seen) const;

  std::unique_ptr<TokenAuthenticator> tokens_;
  std::vector<CertificateGrant> certificates_;
};

// Reads --auth-token-file and --tls-client-tenants; null when both are off.
Status LoadAuthenticator(const SecurityFlags& flags, std::unique_ptr<Authenticator>* out);

// TLS credentials for --tls-cert/--tls-key, mutual TLS (client certificates required and
// verified against --tls-client-ca) when that is set; null when TLS is off.
Status LoadServerCredentials(const SecurityFlags& flags,
                             std::shared_ptr<grpc::ServerCredentials>* credentials);

// A server interceptor for the normd.v1.Trainer service: a call that gRPC's callback layer
// refused because its request bytes do not parse ends with INVALID_ARGUMENT "request does not
// parse as normd.v1.<Type> ..." instead of gRPC's bare UNIMPLEMENTED; with `auth` (not owned,
// may be null) a caller it does not identify gets its refusal instead, as for any call.
// Unary methods only: TrainStream's reads see an undecodable message as the end of the stream.
std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>
MakeUndecodableRequestInterceptorFactory(const Authenticator* auth);

}  // namespace normd::server

#endif  // NORMD_SERVER_SECURITY_H_
