"""normd: the Python client of the normd training service.

    import numpy as np, normd
    c = normd.Client("127.0.0.1:50051")
    m = c.create_model({"input_shape": [4], "layers": [...], "loss": "LOSS_CROSS_ENTROPY",
                        "optimizer": {"sgd": {"lr": 0.1}}}, id="m")
    c.train_step("m", np.random.rand(32, 4), labels=np.zeros(32, dtype=np.int64))

Tensors go in and out as numpy float32 arrays (raw bytes on the wire). Failed calls raise
normd.NormdError with .code (a grpc.StatusCode) and .message (the server's text).
PyTorch interop: normd.to_torch and normd.from_torch (import torch only when used).

The gRPC stubs (normd.v1, normd.health.v1) are generated at build time into
<build>/client/python (CMake target normd_python); put that directory on sys.path next to
client/python, e.g. PYTHONPATH=client/python:build/client/python.
"""

import pkgutil

# The generated half of the package lives in the build tree under another sys.path entry.
__path__ = pkgutil.extend_path(__path__, __name__)

try:
    from normd.v1 import normd_pb2 as pb  # noqa: F401
except ImportError as e:  # pragma: no cover - a setup problem, reported plainly
    raise ImportError(
        "normd's generated stubs (normd.v1) are missing: build the CMake target normd_python "
        "and add <build>/client/python to PYTHONPATH") from e

from normd.client import (Client, FoldResult, ForwardResult, NormdError, from_tensor,  # noqa: E402
                          to_tensor)
from normd.torch_interop import from_torch, to_torch  # noqa: E402

__all__ = ["Client", "FoldResult", "ForwardResult", "NormdError", "from_tensor", "to_tensor", "pb",
           "to_torch", "from_torch"]
