// Status: the outcome of an operation that can fail because of its input.
//
// Bad input from a client is an expected event and travels as a Status value; a broken
// internal invariant is an assert. The server maps StatusCode to grpc::StatusCode in exactly
// one place (server/status_map.cc).
#ifndef NORMD_CORE_STATUS_H_
#define NORMD_CORE_STATUS_H_

#include <sstream>
#include <string>
#include <utility>

namespace normd {

enum class StatusCode {
  kOk = 0,
  kInvalidArgument,
  kFailedPrecondition,
  kNotFound,
  kAlreadyExists,
  kResourceExhausted,
  kUnavailable,
  kAborted,  // a concurrent change interfered; retrying may succeed
  kPermissionDenied,  // the caller is known but may not do this
  kInternal,
};

class Status {
 public:
  Status() = default;  // OK
  Status(StatusCode code, std::string message) : code_(code), message_(std::move(message)) {}

  static Status Ok() { return Status(); }

  bool ok() const { return code_ == StatusCode::kOk; }
  StatusCode code() const { return code_; }
  const std::string& message() const { return message_; }

  // Returns a copy whose message is "<prefix>: <message>".
  Status WithPrefix(const std::string& prefix) const {
    if (ok()) return *this;
    return Status(code_, prefix + ": " + message_);
  }

 private:
  StatusCode code_ = StatusCode::kOk;
  std::string message_;
};

// Concatenates any streamable values into a string.
template <typename... Args>
std::string StrCat(Args&&... args) {
  std::ostringstream os;
  (os << ... << std::forward<Args>(args));
  return os.str();
}

template <typename... Args>
Status InvalidArgument(Args&&... args) {
  return Status(StatusCode::kInvalidArgument, StrCat(std::forward<Args>(args)...));
}
template <typename... Args>
Status FailedPrecondition(Args&&... args) {
  return Status(StatusCode::kFailedPrecondition, StrCat(std::forward<Args>(args)...));
}
template <typename... Args>
Status ResourceExhausted(Args&&... args) {
  return Status(StatusCode::kResourceExhausted, StrCat(std::forward<Args>(args)...));
}
template <typename... Args>
Status Aborted(Args&&... args) {
  return Status(StatusCode::kAborted, StrCat(std::forward<Args>(args)...));
}
template <typename... Args>
Status PermissionDenied(Args&&... args) {
  return Status(StatusCode::kPermissionDenied, StrCat(std::forward<Args>(args)...));
}
template <typename... Args>
Status NotFound(Args&&... args) {
  return Status(StatusCode::kNotFound, StrCat(std::forward<Args>(args)...));
}

}  // namespace normd

// Returns early from the calling function when `expr` yields a non-OK Status.
#define NORMD_RETURN_IF_ERROR(expr)          \
  do {                                       \
    ::normd::Status normd_status_ = (expr);  \
    if (!normd_status_.ok()) return normd_status_; \
  } while (0)

#endif  // NORMD_CORE_STATUS_H_
