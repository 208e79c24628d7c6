// The one mapping from normd::Status (core and server errors) to grpc::Status.
#ifndef NORMD_SERVER_STATUS_MAP_H_
#define NORMD_SERVER_STATUS_MAP_H_

#include <grpcpp/support/status.h>

#include "core/status.h"

namespace normd::server {

// Same code, same message. kOk maps to grpc::Status::OK.
grpc::Status ToGrpcStatus(const Status& status);

// "OK", "INVALID_ARGUMENT", ...: the canonical upper-case name, used as the metrics label.
const char* GrpcCodeName(grpc::StatusCode code);

}  // namespace normd::server

#endif  // NORMD_SERVER_STATUS_MAP_H_
