// Unit tests of server/security: the token file parser, the token comparison, the metadata check
// and the flag combinations that need no certificate (the end-to-end tests in
// tests/security/security_test.py generate certificates with openssl).
#include "server/security.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <map>
#include <string>
#include <vector>

namespace normd::server {
namespace {

using Metadata = std::multimap<grpc::string_ref, grpc::string_ref>;

std::vector<std::string> Parse(const std::string& text) {
  std::vector<TokenGrant> grants;
  const Status s = ParseTokenFile(text, &grants);
  EXPECT_TRUE(s.ok()) << s.message();
  std::vector<std::string> tokens;
  for (const TokenGrant& g : grants) tokens.push_back(g.token);
  return tokens;
}

std::vector<TokenGrant> Grants(const std::vector<std::string>& tokens) {
  std::vector<TokenGrant> grants;
  for (const std::string& t : tokens) grants.push_back(TokenGrant{t, Principal()});
  return grants;
}

TEST(ParseTokenFileTest, OneTokenPerNonEmptyLineTrimmed) {
  EXPECT_EQ(Parse("abc"), std::vector<std::string>({"abc"}));
  EXPECT_EQ(Parse("abc\n"), std::vector<std::string>({"abc"}));
  EXPECT_EQ(Parse("  abc \t\r\n"), std::vector<std::string>({"abc"}));
  // Rotation: old and new token side by side, blank lines and CRLF endings ignored.
  EXPECT_EQ(Parse("\n old-token \r\n\r\n\tnew-token\n\n"),
            std::vector<std::string>({"old-token", "new-token"}));
}

TEST(ParseTokenFileTest, TenantAndAdminFields) {
  std::vector<TokenGrant> g;
  ASSERT_TRUE(ParseTokenFile("bare\nalpha-tok team-a\n beta-tok\tteam_b  admin \n", &g).ok());
  ASSERT_EQ(g.size(), 3u);
  // A bare token keeps its old meaning: tenant default, admin.
  EXPECT_EQ(g[0].token, "bare");
  EXPECT_EQ(g[0].principal.tenant, "default");
  EXPECT_TRUE(g[0].principal.admin);
  EXPECT_EQ(g[1].token, "alpha-tok");
  EXPECT_EQ(g[1].principal.tenant, "team-a");
  EXPECT_FALSE(g[1].principal.admin);
  EXPECT_EQ(g[2].token, "beta-tok");
  EXPECT_EQ(g[2].principal.tenant, "team_b");
  EXPECT_TRUE(g[2].principal.admin);

  auto expect_line_error = [](const std::string& text, const std::string& needle) {
    std::vector<TokenGrant> out;
    const Status s = ParseTokenFile(text, &out);
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << text;
    EXPECT_NE(s.message().find(needle), std::string::npos) << s.message();
  };
  expect_line_error("ok\ntok bad.tenant\n", "tenant on line 2");
  expect_line_error("tok -starts-with-dash\n", "tenant on line 1");
  expect_line_error("tok " + std::string(33, 't') + "\n", "tenant on line 1");
  expect_line_error("tok team root\n", "line 1: the field after the tenant must be 'admin'");
  expect_line_error("tok team admin extra\n", "line 1 has 4 fields");
  expect_line_error("same a\nsame b\n", "line 2 repeats the token");
}

TEST(ParseClientTenantsFileTest, CommonNamesAndSubjectAltNames) {
  std::vector<CertificateGrant> g;
  ASSERT_TRUE(ParseClientTenantsFile("# team a's client\nCN=alice team-a\n"
                                     "SAN=spiffe://example.org/ops ops admin\n", &g).ok());
  ASSERT_EQ(g.size(), 2u);
  EXPECT_EQ(g[0].field, CertificateGrant::Field::kCommonName);
  EXPECT_EQ(g[0].value, "alice");
  EXPECT_EQ(g[0].principal.tenant, "team-a");
  EXPECT_FALSE(g[0].principal.admin);
  EXPECT_EQ(g[1].field, CertificateGrant::Field::kSubjectAltName);
  EXPECT_EQ(g[1].value, "spiffe://example.org/ops");
  EXPECT_TRUE(g[1].principal.admin);
  for (const char* bad : {"alice team-a", "CN= team-a", "CN=alice", "CN=alice bad/tenant",
                          "CN=a t\nCN=a u", "# only a comment", ""}) {
    EXPECT_EQ(ParseClientTenantsFile(bad, &g).code(), StatusCode::kInvalidArgument) << bad;
  }
}

TEST(ParseTokenFileTest, RefusesFilesWithoutATokenOrWithBadTokens) {
  std::vector<TokenGrant> tokens;
  for (const char* text : {"", "\n", "  \n\t\r\n \n"}) {
    const Status s = ParseTokenFile(text, &tokens);
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << "'" << text << "'";
    EXPECT_NE(s.message().find("no token"), std::string::npos) << s.message();
  }
  Status s = ParseTokenFile("ok\n" + std::string(kMaxTokenBytes + 1, 'x') + "\n", &tokens);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("line 2"), std::string::npos) << s.message();
  s = ParseTokenFile("tok\x01en\n", &tokens);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("line 1"), std::string::npos) << s.message();
  s = ParseTokenFile("t\xc3\xa9st\n", &tokens);  // non-ASCII
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  // The longest token accepted parses.
  EXPECT_EQ(Parse(std::string(kMaxTokenBytes, 'y')).at(0).size(), kMaxTokenBytes);
}

TEST(TokenAuthenticatorTest, AcceptsExactlyTheConfiguredTokens) {
  const std::string longest(kMaxTokenBytes, 'k');
  TokenAuthenticator auth(Grants({"s3cret", "rotated-token", longest}));
  EXPECT_EQ(auth.size(), 3u);
  EXPECT_TRUE(auth.Accepts("s3cret"));
  EXPECT_TRUE(auth.Accepts("rotated-token"));
  EXPECT_TRUE(auth.Accepts(longest));

  EXPECT_FALSE(auth.Accepts(""));
  EXPECT_FALSE(auth.Accepts("s3creT"));     // last byte differs
  EXPECT_FALSE(auth.Accepts("S3cret"));     // first byte differs
  EXPECT_FALSE(auth.Accepts("s3cre"));      // prefix
  EXPECT_FALSE(auth.Accepts("s3crets"));    // extension
  EXPECT_FALSE(auth.Accepts(std::string("s3cret\0", 7)));
  EXPECT_FALSE(auth.Accepts("rotated-token s3cret"));
  std::string almost = longest;
  almost.back() = 'j';
  EXPECT_FALSE(auth.Accepts(almost));        // differs only in the last compared byte
  EXPECT_FALSE(auth.Accepts(longest + "k"));  // over kMaxTokenBytes
  EXPECT_FALSE(auth.Accepts(std::string(10 * kMaxTokenBytes, 'k')));
}

TEST(TokenAuthenticatorTest, CheckReadsTheBearerAuthorizationMetadata) {
  std::vector<TokenGrant> grants = Grants({"s3cret", "team-tok"});
  grants[1].principal = Principal{"team-a", false};
  TokenAuthenticator auth(grants);
  const std::string key = "authorization";
  Principal last;
  auto check = [&](std::vector<std::string> values) {
    Metadata md;
    const std::string other_key = "user-agent", other_value = "test";
    md.emplace(grpc::string_ref(other_key), grpc::string_ref(other_value));
    for (const std::string& v : values) md.emplace(grpc::string_ref(key), grpc::string_ref(v));
    Principal who{"unset", false};
    grpc::Status st = auth.Check(md, &who);
    if (st.ok()) last = who;
    return st;
  };
  EXPECT_TRUE(check({"Bearer team-tok"}).ok());
  EXPECT_EQ(last.tenant, "team-a");
  EXPECT_FALSE(last.admin);
  EXPECT_TRUE(check({"Bearer s3cret"}).ok());
  EXPECT_EQ(last.tenant, "default");
  EXPECT_TRUE(last.admin);
  EXPECT_TRUE(check({"bearer s3cret"}).ok());     // the scheme is case-insensitive
  EXPECT_TRUE(check({"Bearer   s3cret "}).ok());  // spaces around the token

  grpc::Status missing = check({});
  EXPECT_EQ(missing.error_code(), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_NE(missing.error_message().find("missing bearer token"), std::string::npos);
  for (std::vector<std::string> bad :
       {std::vector<std::string>{"Bearer wrong!"}, {"Bearer s3cre"}, {"Bearer "}, {"Bearer"},
        {"s3cret"}, {"Basic s3cret"}, {"Bearers3cret"},
        {"Bearer s3cret", "Bearer s3cret"}}) {  // one credential per call
    grpc::Status s = check(bad);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAUTHENTICATED) << bad[0];
    EXPECT_EQ(s.error_message(), "invalid bearer token") << bad[0];
  }
}

class TempFile {
 public:
  explicit TempFile(const std::string& content) {
    char name[] = "/tmp/normd-security-test-XXXXXX";
    const int fd = mkstemp(name);
    EXPECT_GE(fd, 0);
    close(fd);
    path_ = name;
    std::ofstream(path_) << content;
  }
  ~TempFile() { std::remove(path_.c_str()); }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

TEST(ValidateSecurityFlagsTest, CombinationsAndTokenFiles) {
  EXPECT_TRUE(ValidateSecurityFlags({}).ok());
  TempFile some("not a certificate\n");

  auto expect_invalid = [](const SecurityFlags& f, const std::string& needle) {
    const Status s = ValidateSecurityFlags(f);
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << needle;
    EXPECT_NE(s.message().find(needle), std::string::npos) << s.message();
  };
  SecurityFlags f;
  f.tls_cert = some.path();
  expect_invalid(f, "--tls-cert needs --tls-key");
  f = {};
  f.tls_key = some.path();
  expect_invalid(f, "--tls-key needs --tls-cert");
  f = {};
  f.tls_client_ca = some.path();
  expect_invalid(f, "--tls-client-ca");
  f = {};
  f.tls_cert = some.path();
  f.tls_key = some.path();
  expect_invalid(f, "holds no PEM certificate");
  f.tls_cert = "/nonexistent/normd/cert.pem";
  expect_invalid(f, "--tls-cert '/nonexistent/normd/cert.pem' does not exist");

  TempFile tokens("\n first \nsecond\n");
  TempFile empty("");
  TempFile blank(" \n\n");
  f = {};
  f.auth_token_file = tokens.path();
  EXPECT_TRUE(ValidateSecurityFlags(f).ok());
  std::unique_ptr<Authenticator> auth;
  ASSERT_TRUE(LoadAuthenticator(f, &auth).ok());
  ASSERT_NE(auth, nullptr);
  EXPECT_EQ(auth->token_count(), 2u);
  EXPECT_FALSE(auth->certificates_on());
  f.auth_token_file.clear();
  ASSERT_TRUE(LoadAuthenticator(f, &auth).ok());
  EXPECT_EQ(auth, nullptr);  // neither feature: no authenticator, everyone is default
  TempFile mapping("CN=client team-a\n");
  f.tls_client_tenants = mapping.path();
  expect_invalid(f, "--tls-client-tenants needs --tls-client-ca");
  f.tls_client_tenants.clear();
  f.auth_token_file = tokens.path();
  f.auth_token_file = empty.path();
  expect_invalid(f, "--auth-token-file '" + empty.path() + "': it holds no token");
  f.auth_token_file = blank.path();
  expect_invalid(f, "holds no token");
  f.auth_token_file = "/nonexistent/tokens";
  expect_invalid(f, "--auth-token-file '/nonexistent/tokens' does not exist");

  // The description names files and counts, never a token.
  f.auth_token_file = tokens.path();
  const std::string described = DescribeSecurity(f);
  EXPECT_NE(described.find("tokens=2"), std::string::npos) << described;
  EXPECT_NE(described.find("reflection=off"), std::string::npos) << described;
  EXPECT_EQ(described.find("first"), std::string::npos) << described;
  EXPECT_EQ(described.find("second"), std::string::npos) << described;
}

}  // namespace
}  // namespace normd::server
