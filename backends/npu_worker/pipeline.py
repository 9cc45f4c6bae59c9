"""The only ``openvino_genai`` importer: one ``LLMPipeline``, generation serialised, the
NPU busy-time counter read around each generation.

Facts that shape this module (verified on CPU with openvino-genai 2026.4.1):
``generate()`` is not safe to call concurrently on one pipeline, so a lock serialises it;
it releases the GIL, so it runs in a worker thread and the event loop stays free. The
NPU-only properties make a CPU pipeline fail to build, so they are passed only on NPU.
After a streamer returns CANCEL it is called once more to flush and the final result may
hold more text than was streamed, so nothing after a cancel is forwarded.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import openvino_genai as ov_genai

DEFAULT_BUSY_TIME_PATH = "/sys/class/accel/accel0/device/npu_busy_time_us"


class WorkerConfig(msgspec.Struct, frozen=True, kw_only=True):
    model_path: str
    model_id: str
    device: str = "CPU"  # NPU | CPU | GPU | AUTO
    cache_dir: str | None = None
    max_prompt_len: int = 1024
    min_response_len: int = 64
    prefill_hint: str = "DYNAMIC"
    generate_hint: str = "FAST_COMPILE"
    busy_time_path: str = DEFAULT_BUSY_TIME_PATH


class Generation(msgspec.Struct):
    text: str
    tokens: int
    prompt_tokens: int
    cancelled: bool
    generate_ms: float
    busy_before_us: int | None
    busy_after_us: int | None

    @property
    def busy_delta_us(self) -> int | None:
        if self.busy_before_us is None or self.busy_after_us is None:
            return None
        return self.busy_after_us - self.busy_before_us


def pipeline_properties(config: WorkerConfig) -> dict[str, Any]:
    """Device properties: the NPU keys only on NPU (the CPU plugin rejects them)."""
    props: dict[str, Any] = {}
    if config.cache_dir:
        props["CACHE_DIR"] = config.cache_dir
    if config.device == "NPU":
        props.update(
            MAX_PROMPT_LEN=config.max_prompt_len,
            MIN_RESPONSE_LEN=config.min_response_len,
            PREFILL_HINT=config.prefill_hint,
            GENERATE_HINT=config.generate_hint,
        )
    return props


def read_busy_time(path: str) -> int | None:
    try:
        return int(Path(path).read_text().strip())
    except (OSError, ValueError):
        return None


PipelineFactory = Callable[[str, str, dict[str, Any]], Any]


def _openvino_pipeline(path: str, device: str, props: dict[str, Any]) -> Any:
    return ov_genai.LLMPipeline(path, device, props)


class Generator:
    """Owns the pipeline. ``load()`` once; ``generate()`` one at a time."""

    def __init__(self, config: WorkerConfig, *, factory: PipelineFactory | None = None) -> None:
        self.config = config
        self._factory = factory or _openvino_pipeline
        self._pipe: Any = None
        self.initial_load_ms: float | None = None
        self.lock = asyncio.Lock()
        self.busy = False

    @property
    def loaded(self) -> bool:
        return self._pipe is not None

    async def load(self) -> float:
        """Load the pipeline if needed; the milliseconds this call spent loading."""
        if self._pipe is not None:
            return 0.0
        started = time.perf_counter()
        props = pipeline_properties(self.config)
        self._pipe = await asyncio.to_thread(
            self._factory, self.config.model_path, self.config.device, props
        )
        self.initial_load_ms = (time.perf_counter() - started) * 1000
        return self.initial_load_ms

    async def generate(
        self,
        messages: list[dict[str, str]] | None,
        prompt: str | None,
        *,
        max_new_tokens: int,
        on_text: Callable[[str], None] | None = None,
        cancel: threading.Event | None = None,
        seed: int | None = None,
        temperature: float | None = None,
    ) -> Generation:
        """Run one generation under the lock; ``on_text`` gets each streamed piece on the
        event loop, and nothing after ``cancel`` is set."""
        async with self.lock:
            self.busy = True
            try:
                return await self._generate_locked(
                    messages, prompt, max_new_tokens, on_text, cancel, seed, temperature
                )
            finally:
                self.busy = False

    async def _generate_locked(
        self,
        messages: list[dict[str, str]] | None,
        prompt: str | None,
        max_new_tokens: int,
        on_text: Callable[[str], None] | None,
        cancel: threading.Event | None,
        seed: int | None,
        temperature: float | None,
    ) -> Generation:
        loop = asyncio.get_running_loop()
        cancel = cancel or threading.Event()
        pieces: list[str] = []
        gen_config = ov_genai.GenerationConfig(max_new_tokens=max_new_tokens)
        if temperature is not None and temperature > 0:
            gen_config.do_sample = True
            gen_config.temperature = temperature
        if seed is not None:
            gen_config.rng_seed = seed
            gen_config.do_sample = True
        if messages is None:
            gen_config.apply_chat_template = False

        def streamer(text: str) -> Any:
            if cancel.is_set():
                return ov_genai.StreamingStatus.CANCEL  # the flush call lands here too
            pieces.append(text)
            if on_text is not None:
                loop.call_soon_threadsafe(on_text, text)
            return ov_genai.StreamingStatus.RUNNING

        inputs: Any
        if messages is not None:
            inputs = ov_genai.ChatHistory()
            for message in messages:
                inputs.append(message)
        else:
            inputs = [prompt or ""]
        before = read_busy_time(self.config.busy_time_path)
        started = time.perf_counter()
        result = await asyncio.to_thread(self._pipe.generate, inputs, gen_config, streamer)
        generate_ms = (time.perf_counter() - started) * 1000
        after = read_busy_time(self.config.busy_time_path)
        metrics = result.perf_metrics
        return Generation(
            text="".join(pieces),  # never result.texts: it may hold text past a cancel
            tokens=int(metrics.get_num_generated_tokens()),
            prompt_tokens=int(metrics.get_num_input_tokens()),
            cancelled=cancel.is_set(),
            generate_ms=generate_ms,
            busy_before_us=before if self.config.device == "NPU" else None,
            busy_after_us=after if self.config.device == "NPU" else None,
        )
