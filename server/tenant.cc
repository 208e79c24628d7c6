#include "server/tenant.h"

namespace normd::server {
namespace {

constexpr size_t kMaxTenantLength = 32;

bool IsAlnum(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9');
}

}  // namespace

Status ValidateTenantName(std::string_view name, std::string_view what) {
  if (name.empty() || name.size() > kMaxTenantLength) {
    return InvalidArgument(what, " must be 1 to ", kMaxTenantLength, " characters, got ",
                           name.size());
  }
  if (!IsAlnum(name[0])) {
    return InvalidArgument(what, " must start with a letter or a digit, got '", name, "'");
  }
  for (char c : name) {
    if (!IsAlnum(c) && c != '_' && c != '-') {
      return InvalidArgument(what, " may contain only letters, digits, '_' and '-', got '", name,
                             "'");
    }
  }
  return Status::Ok();
}

Status ResolveModelName(const Principal& who, const std::string& name, ModelName* out) {
  const size_t slash = name.find('/');
  if (slash == std::string::npos) {
    out->tenant = who.tenant;
    out->id = name;
    return Status::Ok();
  }
  const std::string tenant = name.substr(0, slash);
  if (tenant != who.tenant) {
    if (!who.admin) return NotFound("model '", name, "' not found");
    NORMD_RETURN_IF_ERROR(ValidateTenantName(tenant, StrCat("the tenant of model '", name, "'")));
  }
  out->tenant = tenant;
  out->id = name.substr(slash + 1);
  return Status::Ok();
}

std::string DisplayName(const std::string& tenant, const std::string& id) {
  return tenant == kDefaultTenant ? id : StrCat(tenant, "/", id);
}

}  // namespace normd::server
