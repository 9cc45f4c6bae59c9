"""The TOML config, parsed into closed msgspec Structs. Invalid config never starts.

Unknown keys, wrong types and missing required keys are rejected with the key's path
(``pools[0].replicas[1].engin``); cross-field rules (unique ids, model names owned by one
pool, a token for a non-loopback bind) are checked after decoding. ``ORCHGATE_API_TOKEN``
overrides ``[auth] token`` and ``ORCHGATE_ADMIN_TOKEN`` ``[auth] admin_token``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from backends.base import Strict, is_loopback
from backends.hardware import HardwareConfig
from backends.registry import ReplicaConfig
from policies.recipes import ModelOverride, RecipeConfig, unknown_placeholders

TOKEN_ENV = "ORCHGATE_API_TOKEN"
ADMIN_TOKEN_ENV = "ORCHGATE_ADMIN_TOKEN"


class ConfigError(Exception):
    """Config that must not be applied; the message names the file and the key."""


class CorsConfig(Strict, frozen=True):
    """Off unless ``allow_origins`` is set. Preflights pass without auth and reflect any
    requested header (the OpenAI JS SDK sends ``X-Stainless-*``)."""

    allow_origins: list[str] = []
    allow_credentials: bool = False
    max_age_s: Annotated[int, Meta(ge=0)] = 600


class ServerConfig(Strict, frozen=True):
    bind: str = "127.0.0.1:8080"
    # Host names this gateway answers besides loopback names and the bind address: a
    # request with any other Host is refused (DNS rebinding). With a wildcard bind
    # (0.0.0.0, ::) and this list empty, any Host is accepted.
    allowed_hosts: list[str] = []
    max_body_bytes: Annotated[int, Meta(ge=1024)] = 10 * 1024 * 1024
    # what a request without "model" gets (default: the only pool's first model)
    default_model: str | None = None
    # the request head (request line and every header) as it arrives; more gets 431
    max_header_bytes: Annotated[int, Meta(ge=1024)] = 64 * 1024
    # the whole request head must arrive within this; the body may pause at most this long
    header_timeout_s: Annotated[float, Meta(gt=0)] = 10.0
    body_timeout_s: Annotated[float, Meta(gt=0)] = 30.0
    # an idle keep-alive connection is closed after this
    keepalive_timeout_s: Annotated[float, Meta(gt=0)] = 5.0
    # open client connections at once; the next one gets 503 and is closed
    max_connections: Annotated[int, Meta(ge=1)] = 4096
    cors: CorsConfig = CorsConfig()
    access_log: bool = True
    # SIGTERM: stop admitting, let running requests finish for this long, then end them
    shutdown_grace_s: Annotated[float, Meta(ge=0)] = 30.0


class AuthConfig(Strict, frozen=True):
    # the data plane: OpenAI routes, tasks, models, read-only status
    token: str | None = None
    # the control plane: anything that changes what runs (reloads, forced releases)
    admin_token: str | None = None


class RetryConfig(Strict, frozen=True):
    """Retries before the first byte (``policies.retry``)."""

    attempts: Annotated[int, Meta(ge=1, le=10)] = 3
    backoff_base_s: Annotated[float, Meta(ge=0)] = 0.05
    backoff_max_s: Annotated[float, Meta(ge=0)] = 2.0
    # retries in flight may be at most this share of the pool's requests in flight ...
    budget_ratio: Annotated[float, Meta(ge=0, le=1)] = 0.2
    # ... or this many, whichever is larger
    budget_min: Annotated[int, Meta(ge=0)] = 3


class TimeoutConfig(Strict, frozen=True):
    """Upstream deadlines. Connect is per replica (``connect_timeout_s``)."""

    # streams: from sending the request to the first byte of the answer
    first_token_s: Annotated[float, Meta(gt=0)] = 120.0
    # streams: the longest silence between two chunks once the answer started
    idle_s: Annotated[float, Meta(gt=0)] = 60.0
    # from the first attempt to the last byte, retries included
    total_s: Annotated[float, Meta(gt=0)] = 600.0


class EjectionConfig(Strict, frozen=True):
    """Passive health: consecutive failures take a replica out for a growing cooldown."""

    consecutive_failures: Annotated[int, Meta(ge=1)] = 5
    cooldown_s: Annotated[float, Meta(gt=0)] = 10.0
    max_cooldown_s: Annotated[float, Meta(gt=0)] = 300.0


SwapStrategy = Literal["blue_green", "replace"]
Identifier = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+\Z")]
ModelNames = Annotated[list[Annotated[str, Meta(min_length=1)]], Meta(min_length=1)]
Replicas = Annotated[list[ReplicaConfig], Meta(min_length=1)]


class PoolVariant(Strict, frozen=True):
    """A named alternative setting of a pool -- another model, other launch settings -- that
    ``POST /v1/pools/{id}/reload`` (and the status page's swap control) can switch to."""

    id: Identifier
    replicas: Replicas
    models: ModelNames | None = None  # default: the pool's own ``models``
    max_context_tokens: Annotated[int, Meta(ge=1)] | None = None


class PoolConfig(Strict, frozen=True):
    id: Identifier
    models: ModelNames
    replicas: Replicas
    queue_capacity: Annotated[int, Meta(ge=0, le=1_000_000)] = 64
    queue_timeout_s: Annotated[float, Meta(gt=0)] = 120.0
    health_interval_s: Annotated[float, Meta(gt=0)] = 5.0
    max_context_tokens: Annotated[int, Meta(ge=1)] = 32768
    retry: RetryConfig = RetryConfig()
    timeouts: TimeoutConfig = TimeoutConfig()
    ejection: EjectionConfig = EjectionConfig()
    # a reload's new replica set must be healthy and answer a warm-up request within this
    reload_timeout_s: Annotated[float, Meta(gt=0)] = 300.0
    # blue_green: the new set starts beside the running one (needs room for both);
    # replace: requests wait while the old set finishes, stops, and the new one starts
    swap_strategy: SwapStrategy = "blue_green"
    variants: list[PoolVariant] = []


class TasksConfig(Strict, frozen=True):
    """The OrchQueue task API: defaults for minimal clients and bounded retention."""

    default_max_tokens: Annotated[int, Meta(ge=1)] = 256
    retention_s: Annotated[float, Meta(ge=0)] = 600.0
    max_finished: Annotated[int, Meta(ge=0)] = 10_000
    # and at most this much memory of their event logs together (a 32k-token task: ~1 MB)
    max_finished_bytes: Annotated[int, Meta(ge=0)] = 256 * 1024 * 1024


class MetricsConfig(Strict, frozen=True):
    """``GET /metrics``: the Home-profile series always; per-backend detail on request."""

    # adds TTFT and duration histograms, upstream errors by kind, retries, ejections and
    # free VRAM per replica (the Home profile keeps these off by default)
    extended: bool = False
    # how often replicas with a ``gpu_device`` are sampled through NVML
    gpu_interval_s: Annotated[float, Meta(gt=0)] = 2.0
    # the status page's charts: how far back the gateway keeps per-pool samples (0: off)
    history_s: Annotated[float, Meta(ge=0, le=86_400)] = 600.0
    history_interval_s: Annotated[float, Meta(ge=0.1)] = 2.0


WebhookEvent = Literal[
    "swap_complete", "swap_failed", "model_loaded", "model_load_failed", "model_unloaded"
]


class WebhookConfig(Strict, frozen=True):
    """A receiver of lifecycle events, POSTed as JSON and signed with HMAC-SHA256
    (``gateway.webhooks``). The secret is given inline or, better, through ``secret_env``."""

    url: Annotated[str, Meta(pattern=r"^https?://")]
    secret: Annotated[str, Meta(min_length=16)] | None = None
    secret_env: str | None = None
    events: list[WebhookEvent] = msgspec.field(
        default_factory=lambda: [
            "swap_complete",
            "swap_failed",
            "model_loaded",
            "model_load_failed",
            "model_unloaded",
        ]
    )
    timeout_s: Annotated[float, Meta(gt=0)] = 5.0
    max_attempts: Annotated[int, Meta(ge=1, le=20)] = 5


class CatalogConfig(Strict, frozen=True):
    """``[catalog]``: models found on disk, started on first request (``gateway.residency``)."""

    dirs: list[str] = []
    recipes: list[RecipeConfig] = []
    models: dict[str, ModelOverride] = {}  # per model id: aliases, idle TTL, pinned...
    idle_ttl_s: Annotated[float, Meta(ge=0)] = 0.0  # 0: loaded models stay until evicted
    max_loaded: Annotated[int, Meta(ge=1)] | None = None
    # what residency may fill, per device ("cpu", "cuda:0"...), in MiB; default: the
    # detected (or [hardware]) RAM and VRAM, less what the system needs
    memory_mib: dict[str, Annotated[int, Meta(ge=1)]] = {}
    load_timeout_s: Annotated[float, Meta(gt=0)] = 300.0
    queue_capacity: Annotated[int, Meta(ge=0, le=1_000_000)] = 64
    queue_timeout_s: Annotated[float, Meta(gt=0)] = 300.0
    rescan_s: Annotated[float, Meta(ge=0)] = 0.0  # 0: at start, on reload and on demand
    # the operator's benchmark scores (policies.scores), blended into the ranking
    scores_file: str | None = None
    score_weight: Annotated[float, Meta(ge=0, le=1)] = 0.5


class ClusterConfig(Strict, frozen=True):
    """Several gateways on one Redis/Valkey (``gateway.cluster``); absent: one process,
    nothing imported. ``standby``: one leader serves, the others wait to take over;
    ``active``: every node serves, admission decided in one shared ledger."""

    mode: Literal["standby", "active"] = "standby"
    url: str = "redis://127.0.0.1:6379/0"  # env ORCHGATE_CLUSTER_URL overrides
    node_id: Identifier | None = None  # default: the host name and a random suffix
    lease_s: Annotated[float, Meta(ge=1, le=60)] = 5.0  # the leader's lease
    heartbeat_s: Annotated[float, Meta(gt=0, le=30)] = 1.0  # renewals and takeover attempts
    op_timeout_s: Annotated[float, Meta(gt=0, le=10)] = 0.5  # any one Redis command
    key_prefix: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")] = "og"


class Config(Strict, frozen=True):
    server: ServerConfig = ServerConfig()
    auth: AuthConfig = AuthConfig()
    tasks: TasksConfig = TasksConfig()
    metrics: MetricsConfig = MetricsConfig()
    hardware: HardwareConfig = HardwareConfig()
    webhooks: list[WebhookConfig] = []
    pools: list[PoolConfig] = []
    catalog: CatalogConfig | None = None
    cluster: ClusterConfig | None = None

    @property
    def host(self) -> str:
        return split_bind(self.server.bind)[0]

    @property
    def port(self) -> int:
        return split_bind(self.server.bind)[1]


_BIND = re.compile(r"^(?:\[(?P<v6>[0-9a-fA-F:.]+)\]|(?P<host>[^:\[\]]+)):(?P<port>\d{1,5})$")


def split_bind(bind: str) -> tuple[str, int]:
    match = _BIND.match(bind)
    if not match or not 0 <= int(match["port"]) <= 65535:
        raise ConfigError(f"server.bind: expected HOST:PORT, got {bind!r}")
    return match["v6"] or match["host"], int(match["port"])


def validate(config: Config) -> None:
    """The cross-field rules; raises ``ConfigError``. Also run on every reload's result."""
    host, _ = split_bind(config.server.bind)
    if not is_loopback(host) and not config.auth.token:
        raise ConfigError(
            f"server.bind is {config.server.bind!r}, which is not loopback, and no token is "
            f"set: refusing to serve without auth. Set [auth] token or {TOKEN_ENV}, or bind "
            "127.0.0.1."
        )
    _check_auth(config.auth)
    _check_cors(config.server.cors)
    owner: dict[str, str] = {}
    replica_ids: set[str] = set()
    _check_default_model(config)
    for i, pool in enumerate(config.pools):
        if pool.id in {p.id for p in config.pools[:i]}:
            raise ConfigError(f"pools[{i}].id: duplicate pool id {pool.id!r}")
        for name in pool.models:
            if name in owner:
                raise ConfigError(
                    f"pools[{i}].models: {name!r} is already served by pool {owner[name]!r}"
                )
            owner[name] = pool.id
        for j, replica in enumerate(pool.replicas):
            if replica.id in replica_ids:
                raise ConfigError(
                    f"pools[{i}].replicas[{j}].id: duplicate replica id {replica.id!r}"
                )
            replica_ids.add(replica.id)
        _check_variants(pool, f"pools[{i}]")
    _check_webhooks(config.webhooks)
    if config.catalog is not None:
        _check_catalog(config.catalog)
    if config.cluster is not None:
        _check_cluster(config)


def _check_cluster(config: Config) -> None:
    cluster = config.cluster
    assert cluster is not None
    if cluster.heartbeat_s * 2 > cluster.lease_s:
        raise ConfigError(
            "cluster.heartbeat_s: renew at least twice per lease (heartbeat_s <= lease_s / 2)"
        )
    if not re.match(r"^rediss?://", cluster.url):
        raise ConfigError("cluster.url: expected redis://HOST:PORT/DB or rediss://...")
    # processes a node starts would run on every node at once: one host's owner is later work
    if config.catalog is not None:
        raise ConfigError("cluster: [catalog] (models on demand) is single-gateway for now")
    for i, pool in enumerate(config.pools):
        for j, replica in enumerate(
            [*pool.replicas, *(r for v in pool.variants for r in v.replicas)]
        ):
            if getattr(replica, "launch", None):
                raise ConfigError(
                    f"pools[{i}].replicas[{j}].launch: in cluster mode replicas are reached by "
                    "url (every node would start its own copy of a managed process)"
                )


def _check_webhooks(webhooks: list[WebhookConfig]) -> None:
    for i, hook in enumerate(webhooks):
        if (hook.secret is None) == (hook.secret_env is None):
            raise ConfigError(f"webhooks[{i}]: set exactly one of secret and secret_env")


def _check_catalog(catalog: CatalogConfig) -> None:
    for i, recipe in enumerate(catalog.recipes):
        unknown = unknown_placeholders(recipe.launch)
        if unknown:
            raise ConfigError(
                f"catalog.recipes[{i}].launch: unknown placeholder(s) {unknown}; known: "
                "{model_path} {mmproj} {host} {port} {ctx} {slots} {gpu} {python} {id}"
            )
        if "{port}" not in " ".join(recipe.launch):
            raise ConfigError(
                f"catalog.recipes[{i}].launch: must pass {{port}} (the gateway picks a free one)"
            )
    for device in catalog.memory_mib:
        if not re.fullmatch(r"cpu|cuda:\d+", device):
            raise ConfigError(f"catalog.memory_mib: {device!r} is not 'cpu' or 'cuda:N'")


def _check_default_model(config: Config) -> None:
    default = config.server.default_model
    served = {name for pool in config.pools for name in pool.models}
    if default is not None and config.pools and default not in served:
        raise ConfigError(f"server.default_model: {default!r} is not a model of any pool")


def _check_cors(cors: CorsConfig) -> None:
    if cors.allow_credentials and "*" in cors.allow_origins:
        raise ConfigError(
            "server.cors: browsers refuse allow_credentials with the '*' origin; list the "
            "origins that may send credentials"
        )


def _check_auth(auth: AuthConfig) -> None:
    if auth.admin_token and auth.admin_token == auth.token:
        raise ConfigError(
            "auth.admin_token: must differ from auth.token, or every data client is an admin"
        )


def _check_variants(pool: PoolConfig, where: str) -> None:
    ids = {"default"}
    for k, variant in enumerate(pool.variants):
        if variant.id in ids:
            raise ConfigError(
                f"{where}.variants[{k}].id: {variant.id!r} is taken ('default' is the pool's "
                "own setting)"
            )
        ids.add(variant.id)
        seen: set[str] = set()
        for j, replica in enumerate(variant.replicas):
            if replica.id in seen:
                raise ConfigError(
                    f"{where}.variants[{k}].replicas[{j}].id: duplicate replica id {replica.id!r}"
                )
            seen.add(replica.id)


def _with_env_tokens(config: Config, env: Mapping[str, str]) -> Config:
    auth = config.auth
    token, admin = env.get(TOKEN_ENV), env.get(ADMIN_TOKEN_ENV)
    if token:
        auth = msgspec.structs.replace(auth, token=token)
    if admin:
        auth = msgspec.structs.replace(auth, admin_token=admin)
    return config if auth is config.auth else msgspec.structs.replace(config, auth=auth)


def parse_config(
    data: str | bytes, *, source: str = "<config>", env: dict[str, str] | None = None
) -> Config:
    """Decode and validate TOML text; apply the token override from ``env``."""
    try:
        config = msgspec.toml.decode(data, type=Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    except msgspec.DecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    config = _with_env_tokens(config, os.environ if env is None else env)
    try:
        validate(config)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return config


def config_from_mapping(data: dict[str, object], *, env: dict[str, str] | None = None) -> Config:
    """Build a config from a mapping shaped like the TOML file (tests, embedded defaults)."""
    try:
        config = msgspec.convert(data, type=Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"<mapping>: {exc}") from None
    config = _with_env_tokens(config, os.environ if env is None else env)
    validate(config)
    return config


def load_config(path: str | Path, *, env: dict[str, str] | None = None) -> Config:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from None
    return parse_config(data, source=str(path), env=env)
