"""``orchgate npu-worker``: serve the worker over HTTP, or run one job and print its JSON.

CLI mode exits 0 only when the job succeeded (and, on NPU, the busy-time counter rose).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

import msgspec

from backends import assets

DEFAULT_PORT = 18820


def default_model() -> str | None:
    """The embedded default's SmolLM2 GGUF, fetched into orchgate's cache on first use;
    None (the reason printed) when it cannot be had."""
    try:
        return str(assets.ensure(assets.SMOLLM2, log=_note))
    except assets.AssetError as exc:
        _note(str(exc))
        return None


def _note(message: str) -> None:
    print(f"orchgate: {message}", file=sys.stderr, flush=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="listen address (loopback)")
    parser.add_argument(
        "--allow-remote",
        action="store_true",
        help="allow a non-loopback --host; needs a token in the --token-env variable",
    )
    parser.add_argument(
        "--token-env",
        default="ORCHGATE_WORKER_TOKEN",
        help="environment variable holding the bearer token every route but /healthz needs",
    )
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument(
        "--model", help="OpenVINO IR folder or GGUF file (default: the embedded SmolLM2 GGUF)"
    )
    parser.add_argument("--model-id", help="name reported by /healthz and /models")
    parser.add_argument("--device", default="CPU", choices=["NPU", "CPU", "GPU", "AUTO"])
    parser.add_argument("--cache-dir")
    parser.add_argument("--max-prompt-len", type=int, default=1024)
    parser.add_argument("--min-response-len", type=int, default=64)
    parser.add_argument("--prefill-hint", default="DYNAMIC")
    parser.add_argument("--generate-hint", default="FAST_COMPILE")
    parser.add_argument("--busy-time-path")
    parser.add_argument("--job", help="CLI mode: run one job, print the JSON, exit")
    parser.add_argument("--input", help="CLI mode: the job's input text")
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--log-level", default="info")


def run(args: argparse.Namespace) -> int:
    import logging
    import os

    token = os.environ.get(args.token_env) or None
    from backends.base import is_loopback

    if not is_loopback(args.host) and not (args.allow_remote and token):
        print(
            f"orchgate npu-worker: --host {args.host} is not loopback; the worker has no "
            f"other protection, so this needs --allow-remote and a token in ${args.token_env}",
            file=sys.stderr,
        )
        return 2
    args.token = token

    from backends.npu_worker.pipeline import DEFAULT_BUSY_TIME_PATH, Generator, WorkerConfig

    model = args.model or default_model()
    if model is None:
        print(
            "orchgate npu-worker: pass --model (the embedded SmolLM2 GGUF is not available)",
            file=sys.stderr,
        )
        return 2
    config = WorkerConfig(
        model_path=model,
        model_id=args.model_id or model.rsplit("/", 1)[-1],
        device=args.device,
        cache_dir=args.cache_dir,
        max_prompt_len=args.max_prompt_len,
        min_response_len=args.min_response_len,
        prefill_hint=args.prefill_hint,
        generate_hint=args.generate_hint,
        busy_time_path=args.busy_time_path or DEFAULT_BUSY_TIME_PATH,
    )
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr, format="%(message)s")
    generator = Generator(config)
    if args.job is not None:
        return asyncio.run(_one_job(generator, args))
    return _serve(generator, args)


async def _one_job(generator: object, args: argparse.Namespace) -> int:
    from backends.npu_worker.app import run_job

    body = {"job": args.job, "input": args.input, "max_new_tokens": args.max_new_tokens}
    status, payload = await run_job(generator, body)  # type: ignore[arg-type]
    sys.stdout.write(msgspec.json.format(msgspec.json.encode(payload)).decode() + "\n")
    return 0 if status == 200 else 1


def _serve(generator: object, args: argparse.Namespace) -> int:
    import uvicorn

    from backends.npu_worker.app import AccessLog, RequireToken, create_worker_app

    bind = f"{args.host}:{args.port}"
    inner: Any = create_worker_app(generator, bind=bind)  # type: ignore[arg-type]
    if args.token:
        inner = RequireToken(inner, args.token)
    app = AccessLog(inner)

    async def preload_then_serve() -> None:
        await generator.load()  # type: ignore[attr-defined]
        config = uvicorn.Config(
            app,
            host=args.host,
            port=args.port,
            loop="none",
            http="httptools",
            lifespan="off",
            access_log=False,
            log_level="warning",
        )
        await uvicorn.Server(config).serve()

    import uvloop

    uvloop.run(preload_then_serve())
    return 0
