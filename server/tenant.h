// Tenants: who a Trainer call acts for, and how the model names it writes resolve.
//
// Every Trainer call acts for a Principal: a tenant and whether that tenant's credential is an
// admin's. The principal comes from the call's bearer token or client certificate (see
// server/security.h); without either feature every call is tenant "default" and admin, exactly
// as before tenants existed.
//
// Model ids live in their tenant's namespace: tenant a's "mlp" and tenant b's "mlp" are two
// models. A name in a request is either
//   - a plain model id, "mlp": the caller's own tenant's model, or
//   - a qualified name, "TENANT/ID" ("b/mlp"): tenant TENANT's model. Only admins may name
//     another tenant's model; for anyone else it resolves to NOT_FOUND, the answer for a model
//     that does not exist, so a tenant learns nothing about other tenants' models.
// Naming one's own tenant explicitly ("a/mlp" from tenant a) is always allowed.
//
// Tenant names are 1 to 32 characters of [A-Za-z0-9_-] starting with a letter or digit: they
// become metric label values and a directory name ("@TENANT") in the data directory.
#ifndef NORMD_SERVER_TENANT_H_
#define NORMD_SERVER_TENANT_H_

#include <string>
#include <string_view>

#include "core/status.h"

namespace normd::server {

constexpr char kDefaultTenant[] = "default";

struct Principal {
  std::string tenant = kDefaultTenant;
  bool admin = true;
};

// INVALID_ARGUMENT naming `what` ("tenant on line 3") unless `name` is a valid tenant name.
Status ValidateTenantName(std::string_view name, std::string_view what);

// A model's place: its tenant and its id within that tenant.
struct ModelName {
  std::string tenant;
  std::string id;
};

// Resolves `name` as `who` wrote it (see above). The id part is not validated here (the caller
// does, as it did before tenants). NOT_FOUND "model '<name>' not found" when a non-admin names
// another tenant; INVALID_ARGUMENT when an admin's qualified name has an invalid tenant part.
Status ResolveModelName(const Principal& who, const std::string& name, ModelName* out);

// How logs and admins see a model: the bare id in the default tenant (as before tenants), and
// "TENANT/ID" in any other. Also what ResolveModelName accepts back.
std::string DisplayName(const std::string& tenant, const std::string& id);

}  // namespace normd::server

#endif  // NORMD_SERVER_TENANT_H_
