"""Who may call what through the guard. The admin key (``contract.protocol.ADMIN_HEADER``, the same header or
metadata key on HTTP and gRPC) is needed for model control, shared-memory registration, logging, trace settings and
statistics, for any request to an internal model (``dit_preprocess``, ``dit_engine``, ``flux_text_encoder``,
``flux_vae``: the supervisor's probes carry the key), and for an inference that names a shared-memory region. Model
loads that override a config or a file are refused whatever the key: code in a model's files runs as the server's
user. Triton's generate extension, which these models do not use, is refused."""

from __future__ import annotations

import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass

from flux_triton.contract.protocol import ADMIN_HEADER
from flux_triton.deploy.guard.checks import Refused

# Paths of the restricted APIs; the per-model statistics and trace settings are below.
RESTRICTED_PATHS = ("/v2/repository", "/v2/systemsharedmemory", "/v2/cudasharedmemory", "/v2/logging", "/v2/trace")
ALL_STATISTICS = "/v2/models/stats"
MODEL_PATH = re.compile(r"/v2/models/(?P<model>[^/]+)(?:/versions/[0-9]+)?(?P<action>/.*)?")
RESTRICTED_ACTIONS = ("/stats", "/trace/setting")
UNSERVED_ACTIONS = ("/generate", "/generate_stream")
LOAD_PATH = re.compile(r"/v2/repository/models/[^/]+/load")
PLAIN_PATH = re.compile(r"[A-Za-z0-9_./-]*")  # what a client of these models sends; no encodings to read twice

# The gRPC methods of the restricted APIs (GRPCInferenceService).
RESTRICTED_METHODS = {
    "RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload", "SystemSharedMemoryStatus",
    "SystemSharedMemoryRegister", "SystemSharedMemoryUnregister", "CudaSharedMemoryStatus",
    "CudaSharedMemoryRegister", "CudaSharedMemoryUnregister", "TraceSetting", "LogSettings", "ModelStatistics",
}  # fmt: skip


@dataclass(frozen=True)
class Route:
    """An HTTP request as the guard handles it: ``infer`` (checked), ``load`` (a model load, its body checked) or
    ``other``; the model it names; whether it needs the admin key."""

    kind: str
    model: str | None
    restricted: bool


@dataclass(frozen=True)
class Policy:
    admin_key: str | None  # None: nobody has it, every restricted call is refused
    internal_models: frozenset[str]

    def has_key(self, given: str | None) -> bool:
        return bool(self.admin_key and given) and hmac.compare_digest(given.encode(), self.admin_key.encode())

    def require_key(self, given: str | None, what: str) -> None:
        if not self.has_key(given):
            raise Refused(f"{what} needs this server's admin key (header {ADMIN_HEADER})", 403)

    def http_route(self, path: str) -> Route:
        """How to handle a request for ``path`` (refuses an encoded path and the generate extension)."""
        if not PLAIN_PATH.fullmatch(path) or not path.startswith("/"):
            raise Refused(f"path {path[:80]!r}: only letters, digits and _./- are accepted")
        if any(segment in ("", ".", "..") for segment in path.split("/")[1:]):  # /x/../y: routed as /y further on
            raise Refused(f"path {path[:80]!r}: empty, . and .. segments are not accepted")
        if path == ALL_STATISTICS:
            return Route("other", None, restricted=True)
        if path.startswith(RESTRICTED_PATHS):
            return Route("load" if LOAD_PATH.fullmatch(path) else "other", None, restricted=True)
        found = MODEL_PATH.fullmatch(path)
        if found is None:
            return Route("other", None, restricted=False)
        model, action = found["model"], found["action"] or ""
        if action in UNSERVED_ACTIONS:
            raise Refused(f"{path}: Triton's generate extension is not served here; use /infer", 404)
        restricted = action in RESTRICTED_ACTIONS or model in self.internal_models
        return Route("infer" if action.startswith("/infer") else "other", model, restricted)

    def grpc_restricted(self, method: str, model: str | None) -> bool:
        return method in RESTRICTED_METHODS or model in self.internal_models


def check_load(parameters: Mapping) -> None:
    """Refuse a model load that carries a config or file overrides (``config``, ``file:<path>``)."""
    overrides = sorted(key for key in parameters if key == "config" or str(key).startswith("file:"))
    if overrides:
        raise Refused(f"model load: overriding {overrides[0]!r:.60} is refused; the server loads models from its "
                      f"repository only", 403)  # fmt: skip
