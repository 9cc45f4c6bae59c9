"""Engines: the backend contract, its adapters and the registry of engine types.

Imports neither ``policies`` nor ``gateway``.
"""

from backends.base import Backend, Endpoint, ReplicaInfo, ReplicaLoad, UpstreamCall
from backends.errors import BackendError
from backends.registry import ENGINES, ReplicaConfig, build_backend

__all__ = [
    "ENGINES",
    "Backend",
    "BackendError",
    "Endpoint",
    "ReplicaConfig",
    "ReplicaInfo",
    "ReplicaLoad",
    "UpstreamCall",
    "build_backend",
]
