// Who may talk to normd: TLS and mutual-TLS server credentials from PEM files, bearer-token
// admission for the Trainer service, and the interceptor that turns gRPC's answer to an
// undecodable request into INVALID_ARGUMENT.
//
// Bearer tokens are checked where a Trainer call is admitted (TrainerService, before anything
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
#include <string>
#include <string_view>
#include <vector>

#include "core/status.h"

namespace normd::server {

// The security flags; an empty path leaves that feature off.
struct SecurityFlags {
  std::string tls_cert;         // PEM server certificate chain (--tls-cert)
  std::string tls_key;          // PEM private key of that certificate (--tls-key)
  std::string tls_client_ca;    // PEM CA bundle client certificates must chain to (--tls-client-ca)
  std::string auth_token_file;  // accepted bearer tokens, one per line (--auth-token-file)
};

// Checks the combination (--tls-cert and --tls-key together; --tls-client-ca needs both) and that
// every named file is readable and holds what it should: a certificate whose public key matches
// the private key, at least one CA certificate, at least one token. INVALID_ARGUMENT naming the
// flag. Never puts a key or token in a message.
Status ValidateSecurityFlags(const SecurityFlags& flags);

// One "name=value" line per feature for --check-config and the start-up log (paths and counts,
// never secrets). REQUIRES: ValidateSecurityFlags(flags) is OK.
std::string DescribeSecurity(const SecurityFlags& flags);

// Longest bearer token accepted, in bytes. Every comparison costs the same for tokens up to this
// size; a presented token longer than this is refused without comparing.
constexpr size_t kMaxTokenBytes = 512;

// Parses a token file: one token per non-empty line, surrounding spaces, tabs and CR trimmed.
// INVALID_ARGUMENT when no token is left, when a token is longer than kMaxTokenBytes, or when a
// token contains a character a gRPC metadata value cannot carry (outside printable ASCII).
// Several lines let tokens rotate: add the new one, move clients over, remove the old one.
Status ParseTokenFile(std::string_view text, std::vector<std::string>* tokens);

// Accepts the calls whose metadata carries `authorization: Bearer <token>` for one of its tokens.
// Immutable after construction, so thread-safe.
class TokenAuthenticator {
 public:
  // REQUIRES: tokens is not empty; each token has 1 to kMaxTokenBytes bytes.
  explicit TokenAuthenticator(const std::vector<std::string>& tokens);

  // OK, or UNAUTHENTICATED: "missing bearer token ..." when the call carries no authorization
  // metadata, "invalid bearer token" when it carries anything but an accepted token.
  grpc::Status Check(const std::multimap<grpc::string_ref, grpc::string_ref>& metadata) const;

  // Compares `token` with every accepted token, each comparison over kMaxTokenBytes bytes with
  // no early exit, so the time taken tells neither where a guess first differs nor how long
  // the accepted tokens are.
  bool Accepts(std::string_view token) const;

  size_t size() const { return tokens_.size(); }

 private:
  struct Padded {
    std::array<unsigned char, kMaxTokenBytes> bytes{};  // the token, then zeros
    size_t length = 0;
  };
  std::vector<Padded> tokens_;
};

// Reads the token file named by flags.auth_token_file. REQUIRES: it is not empty.
Status LoadTokenAuthenticator(const SecurityFlags& flags,
                              std::unique_ptr<TokenAuthenticator>* authenticator);

// TLS credentials for --tls-cert/--tls-key, mutual TLS (client certificates required and
// verified against --tls-client-ca) when that is set; null when TLS is off.
Status LoadServerCredentials(const SecurityFlags& flags,
                             std::shared_ptr<grpc::ServerCredentials>* credentials);

// A server interceptor for the normd.v1.Trainer service: a call that gRPC's callback layer
// refused because its request bytes do not parse ends with INVALID_ARGUMENT "request does not
// parse as normd.v1.<Type> ..." instead of gRPC's bare UNIMPLEMENTED; with `auth` (not owned,
// may be null) a caller without an accepted token gets UNAUTHENTICATED instead, as for any call.
// Unary methods only: TrainStream's reads see an undecodable message as the end of the stream.
std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>
MakeUndecodableRequestInterceptorFactory(const TokenAuthenticator* auth);

}  // namespace normd::server

#endif  // NORMD_SERVER_SECURITY_H_
