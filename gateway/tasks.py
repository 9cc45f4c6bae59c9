"""OrchQueue v1 tasks: admission at submit, a runner per task, a replayable event log and
race-free cancel.

A task's SSE events are appended to its own log, so a client that attaches late (or twice)
replays everything from ``started``; nothing produced before it attached is lost.

Race-free cancel: ``cancel()`` runs on the event loop without awaiting. It marks the task
finished and appends ``end {cancelled: true}`` before it returns (and so before the 204 is
sent); every later token append sees a finished task and is dropped. Then the runner is
cancelled: a queued task leaves the queue, a running one closes its upstream connection
(the engine frees the slot) and releases its lease.
"""

from __future__ import annotations

import asyncio
import enum
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Annotated, Any, Protocol

import msgspec
from msgspec import Meta

from backends.base import Endpoint, UpstreamCall
from backends.errors import (
    BackendError,
    BackendInterrupted,
    BackendOverloaded,
    BackendRejected,
    BackendTimeout,
)
from gateway.config import TasksConfig
from gateway.exchange import Exchange
from gateway.logging import AccessLog, TaskRecord
from gateway.streaming import (
    CODE_SHUTDOWN,
    CODE_TIMEOUT,
    Reader,
    SseReader,
    event_data,
    split_events,
)
from policies.admission import AdmissionError, Priority, Ticket

if TYPE_CHECKING:
    from backends.base import UpstreamResponse
    from gateway.pools import PoolRuntime
    from policies.replicas import ReplicaLatency

_encoder = msgspec.json.Encoder()
# \Z, not $: "$" also matches before a final newline, and a task id becomes an upstream
# X-Request-Id header
_TASK_ID = r"^[A-Za-z0-9._:-]{1,128}\Z"
# per retained event: the list slot and the bytes object's header, beside its payload
_EVENT_OVERHEAD_BYTES = 41


class Workload(enum.StrEnum):
    COMPLETION = "completion"
    EMBEDDING = "embedding"
    RERANK = "rerank"


class TaskRequest(msgspec.Struct, kw_only=True):
    """llama-orch v1 TaskRequest field names, all optional here, plus conveniences.
    Unknown fields are accepted and ignored, as llama-orch's schema and server allow
    (SPEC.md); the config file stays strict."""

    task_id: Annotated[str, Meta(pattern=_TASK_ID)] | None = None
    session_id: str | None = None
    workload: Workload = Workload.COMPLETION
    model_ref: str | None = None
    model: str | None = None
    engine: str | None = None
    ctx: Annotated[int, Meta(ge=0)] | None = None
    priority: Priority = Priority.INTERACTIVE
    max_tokens: Annotated[int, Meta(ge=1)] | None = None
    deadline_ms: Annotated[int, Meta(ge=0)] | None = None
    seed: int | None = None
    prompt: str | None = None
    inputs: list[str] | None = None
    messages: list[dict[str, Any]] | None = None
    params: dict[str, Any] | None = None
    # v1 optional fields accepted for compatibility; the Home profile does not act on them
    determinism: str | None = None
    sampler_profile_version: str | None = None
    expected_tokens: int | None = None
    kv_hint: str | None = None
    placement: dict[str, Any] | None = None


class TaskState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINISHED = frozenset({TaskState.COMPLETED, TaskState.FAILED, TaskState.CANCELLED})


class _Delta(msgspec.Struct):
    content: str | None = None


class _Choice(msgspec.Struct):
    delta: _Delta | None = None
    text: str | None = None


class _Chunk(msgspec.Struct):
    choices: list[_Choice] = []
    error: dict[str, Any] | None = None


_chunk_decoder = msgspec.json.Decoder(_Chunk)
# the engine's usage counts feed tokens_in_total (a task's own stream has no usage event)
_ASK_FOR_USAGE = {"stream_options": {"include_usage": True}}


def _task_record(task: Task) -> TaskRecord:
    finished = task.finished_at or time.time()
    started = task.started_at
    return TaskRecord(
        ts=finished,
        task_id=task.id,
        state=task.state.value,
        pool=task.pool.id,
        engine=task.engine,
        priority=task.priority.value,
        duration_ms=round((finished - task.created_at) * 1000, 3),
        replica=task.replica_id,
        queue_ms=None if started is None else round((started - task.created_at) * 1000, 3),
        tokens_in=task.tokens_in,
        tokens_out=task.tokens_out,
        error=None if task.error is None else str(task.error.get("code")),
    )


def sse(event: str, data: dict[str, Any]) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + _encoder.encode(data) + b"\n\n"


def failover_error(engine: str) -> dict[str, Any]:
    return {"code": "WORKER_RESET", "message": FAILOVER_MESSAGE, "engine": engine,
            "retriable": True}  # fmt: skip


class EventSink(Protocol):
    """Where a task's events are made durable before its readers see them (the cluster's
    task log); ``publish`` hands each frame on and calls ``task.deliver`` once stored."""

    def publish(self, task: Task, frame: bytes) -> None: ...


class RemoteTasks(Protocol):
    """Tasks other gateways ran (the cluster's task log): their view and stored events."""

    async def view(self, task_id: str) -> dict[str, Any] | None: ...

    async def frames(self, task_id: str, after: int) -> AsyncIterator[bytes] | None: ...

    async def cancel(self, task_id: str) -> bool | None: ...


# what the new owner of a task whose gateway stopped leading ends it with: the same bytes
# wherever it is written, so a client never holds one id with two different contents
FAILOVER_MESSAGE = "the gateway running this task stopped serving; submit it again"


class Task:
    __slots__ = (
        "_changed",
        "_next_id",
        "sink",
        "unpublished",
        "created_at",
        "decode_started",
        "engine",
        "error",
        "event_bytes",
        "events",
        "finished_at",
        "id",
        "pool",
        "predicted_start_ms",
        "priority",
        "replica_id",
        "runner",
        "started_at",
        "state",
        "ticket",
        "tokens_in",
        "tokens_out",
    )

    def __init__(self, task_id: str, pool: PoolRuntime, priority: Priority, ticket: Ticket) -> None:
        self.id = task_id
        self.pool = pool
        self.engine = pool.engine
        self.priority = priority
        self.ticket = ticket
        self.state = TaskState.QUEUED
        self.events: list[bytes] = []
        self.event_bytes = 0  # what the event log holds in memory, roughly
        self.tokens_out = 0
        self.tokens_in: int | None = None
        self.replica_id: str | None = None
        self.created_at = time.time()
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.decode_started: float | None = None
        self.error: dict[str, Any] | None = None
        self.predicted_start_ms = 0
        self.runner: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        self._next_id = 1  # the SSE id of the next event
        self.sink: EventSink | None = None  # [cluster]: events are stored before delivery
        self.unpublished = 0  # events handed to the sink, not yet delivered

    @property
    def finished(self) -> bool:
        return self.state in FINISHED

    @property
    def drained(self) -> bool:
        """Finished, and every event delivered to the readers."""
        return self.state in FINISHED and self.unpublished == 0

    def _append(self, frame: bytes) -> None:
        # every event carries its ordinal as the SSE id: a client that reconnects with
        # Last-Event-ID: n resumes at event n + 1 (no loss, no duplicate)
        frame = b"id: %d\n%b" % (self._next_id, frame)
        self._next_id += 1
        if self.sink is not None:
            self.unpublished += 1
            self.sink.publish(self, frame)
            return
        self.deliver([frame])

    def deliver(self, frames: list[bytes]) -> None:
        """Events the readers may have now (at once; with a sink, once it stored them)."""
        for frame in frames:
            self.events.append(frame)
            self.event_bytes += len(frame) + _EVENT_OVERHEAD_BYTES
        if self.sink is not None:
            self.unpublished -= len(frames)
        # set() resolves every current waiter; clear() at once re-arms the same event for
        # the next append, so no Event is allocated per token
        self._changed.set()
        self._changed.clear()

    def fenced(self) -> None:
        """The sink could not store events because this gateway stopped leading: what was
        not stored is dropped, the task ends here with the error its new owner writes."""
        self.sink, self.unpublished = None, 0
        self._next_id = len(self.events) + 1
        if not self.finished:
            self.state = TaskState.FAILED
            self.finished_at = time.time()
        self.error = failover_error(self.engine)
        self.deliver([b"id: %d\n%b" % (self._next_id, sse("error", self.error))])
        self._next_id += 1
        if self.runner is not None:
            self.runner.cancel()

    def start(self) -> None:
        if self.finished:
            return
        self.state = TaskState.RUNNING
        self.started_at = time.time()
        self.decode_started = time.perf_counter()
        self._append(
            sse(
                "started",
                {
                    "queue_position": self.ticket.position,
                    "predicted_start_ms": self.predicted_start_ms,
                },
            )
        )

    def token(self, text: str) -> None:
        if self.finished:
            return  # cancelled: nothing after the acknowledgement
        self._append(sse("token", {"t": text, "i": self.tokens_out}))
        self.tokens_out += 1

    def _decode_ms(self) -> int:
        if self.decode_started is None:
            return 0
        return int((time.perf_counter() - self.decode_started) * 1000)

    def end(self, *, cancelled: bool = False) -> None:
        if self.finished:
            return
        self.state = TaskState.CANCELLED if cancelled else TaskState.COMPLETED
        self.finished_at = time.time()
        decode_ms = self._decode_ms()
        payload: dict[str, Any] = {
            "tokens_out": self.tokens_out,
            "decode_time_ms": decode_ms,
            "decode_ms": decode_ms,
        }
        if cancelled:
            payload["cancelled"] = True
        self._append(sse("end", payload))

    def fail(
        self, code: str, message: str, *, retriable: bool, retry_after_ms: int | None = None
    ) -> None:
        if self.finished:
            return
        self.state = TaskState.FAILED
        self.finished_at = time.time()
        self.error = {
            "code": code,
            "message": message,
            "engine": self.engine,
            "retriable": retriable,
        }
        if retry_after_ms is not None:
            self.error["retry_after_ms"] = retry_after_ms
        self._append(sse("error", self.error))

    async def frames(self, heartbeat_s: float = 15.0, after: int = 0) -> AsyncIterator[bytes]:
        """Every event after the ``after``-th (0: from the first), then new ones as they
        come, until the task ends. Idle gaps get an SSE comment so proxies keep the
        connection open."""
        index = after
        while True:
            while index < len(self.events):
                yield self.events[index]
                index += 1
            if self.drained:
                return
            try:  # asyncio.timeout, not wait_for: see policies.health (cpython#86296)
                async with asyncio.timeout(heartbeat_s):
                    await self._changed.wait()
            except TimeoutError:
                yield b": keep-alive\n\n"

    def view(self) -> dict[str, Any]:
        position = self.ticket.current_position() if self.state is TaskState.QUEUED else 0
        out: dict[str, Any] = {
            "task_id": self.id,
            "state": self.state.value,
            "pool_id": self.pool.id,
            "engine": self.engine,
            "priority": self.priority.value,
            "queue_position": position,
            "tokens_out": self.tokens_out,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
        }
        if self.error is not None:
            out["error"] = self.error
        return out


class CancelOutcome(enum.Enum):
    CANCELLED = "cancelled"
    ALREADY_CANCELLED = "already_cancelled"
    ALREADY_FINISHED = "already_finished"


# the relay's in-band error codes -> OrchQueue error codes
_INBAND_CODES = {CODE_TIMEOUT: "DECODE_TIMEOUT", CODE_SHUTDOWN: "POOL_UNAVAILABLE"}


def _error_code(error: BackendError) -> tuple[str, bool]:
    if isinstance(error, BackendTimeout):
        return "DECODE_TIMEOUT", True
    if isinstance(error, BackendInterrupted | BackendOverloaded):
        return "POOL_UNAVAILABLE", True
    if isinstance(error, BackendRejected):
        return "INVALID_PARAMS", False
    if error.retryable:
        return "WORKER_RESET", True
    return "INTERNAL", False


def _open_reader(upstream: UpstreamResponse) -> Reader:
    return SseReader(upstream, hide_usage=True)  # tasks relay text, never usage chunks


class TaskBook:
    """All tasks, by id. Finished tasks are kept for ``retention_s``, at most
    ``max_finished`` of them and at most ``max_finished_bytes`` of event logs together
    (oldest first out), so memory stays bounded under any load."""

    def __init__(
        self,
        config: TasksConfig,
        log: AccessLog | None = None,
        latency: dict[str, ReplicaLatency] | None = None,
    ) -> None:
        self.config = config
        self.log = log  # one line per finished task
        self.latency = {} if latency is None else latency  # [metrics] extended
        self._tasks: dict[str, Task] = {}
        self.sink: EventSink | None = None  # [cluster]: where events are stored first
        self.remote: RemoteTasks | None = None  # [cluster]: tasks other nodes ran
        self._finished: OrderedDict[str, tuple[float, int]] = OrderedDict()  # when, bytes
        self._finished_bytes = 0

    def __len__(self) -> int:
        return len(self._tasks)

    def get(self, task_id: str) -> Task | None:
        return self._tasks.get(task_id)

    @staticmethod
    def new_id() -> str:
        """A random UUID (the contract's ``format: uuid``): nobody can claim the next one."""
        return str(uuid.uuid4())

    def active(self) -> int:
        return sum(1 for t in self._tasks.values() if not t.finished)

    def submit(
        self,
        task_id: str,
        pool: PoolRuntime,
        priority: Priority,
        ticket: Ticket,
        payload: dict[str, Any],
        endpoint: Endpoint,
    ) -> Task:
        """Start a task that already holds its admission ``ticket``. ``payload`` is the
        upstream body without ``model``, which is filled in per replica."""
        self._evict()
        task = Task(task_id, pool, priority, ticket)
        task.sink = self.sink
        task.predicted_start_ms = int(pool.queue.wait_estimate_s(ticket.position) * 1000)
        self._tasks[task_id] = task
        task.runner = asyncio.create_task(
            self._run(task, payload, endpoint), name=f"task:{task_id}"
        )
        return task

    def cancel(self, task: Task) -> CancelOutcome:
        if task.state is TaskState.CANCELLED:
            return CancelOutcome.ALREADY_CANCELLED
        if task.finished:
            return CancelOutcome.ALREADY_FINISHED
        task.end(cancelled=True)  # the acknowledgement point: no token event after this
        task.ticket.abandon()  # a queued task leaves the queue now, even if its runner
        if task.runner is not None:  # has not started yet
            task.runner.cancel()
        self._mark_finished(task)
        return CancelOutcome.CANCELLED

    async def _run(self, task: Task, payload: dict[str, Any], endpoint: Endpoint) -> None:
        try:
            await self._execute(task, payload, endpoint)
        except asyncio.CancelledError:
            # cancel() has already ended the task; otherwise the gateway is shutting down
            task.fail(
                "POOL_UNAVAILABLE",
                "the gateway is shutting down",
                retriable=True,
                retry_after_ms=1000,
            )
        except AdmissionError as error:
            task.fail(
                "POOL_UNAVAILABLE",
                str(error),
                retriable=True,
                retry_after_ms=int(error.retry_after_s * 1000),
            )
        except BackendError as error:
            code, retriable = _error_code(error)
            task.fail(
                code,
                error.message,
                retriable=retriable,
                retry_after_ms=int(error.retry_after_s * 1000)
                if error.retry_after_s is not None
                else None,
            )
        except Exception as error:  # noqa: BLE001 - a task must end, whatever happened
            task.fail("INTERNAL", f"gateway error: {type(error).__name__}", retriable=False)
        finally:
            task.ticket.abandon()
            self._mark_finished(task)

    async def _execute(self, task: Task, payload: dict[str, Any], endpoint: Endpoint) -> None:
        pool = task.pool

        def make_call(replica_id: str) -> UpstreamCall:
            body = _encoder.encode(
                {**payload, "model": pool.upstream_model[replica_id], **_ASK_FOR_USAGE}
            )
            return UpstreamCall(endpoint, body, True, task.id, hide_usage=True)

        ex = Exchange(task.id, self.latency)
        try:
            committed = await ex.open(
                pool, task.priority, make_call, open_reader=_open_reader, ticket=task.ticket
            )
            ex.first_byte = time.perf_counter()
            task.replica_id = ex.replica
            task.start()
            reader = committed.reader
            assert reader is not None
            self._consume(task, committed.first)
            async for batch in reader.rest():
                if self._consume(task, batch):
                    break
            task.end()
        finally:
            if ex.committed is not None:
                reader = ex.committed.reader
                usage = reader.stats.usage if reader is not None else None
                task.tokens_in = usage.tokens()[0] if usage is not None else None
                # out: what the task's client received
                ex.count_tokens(task.tokens_in or 0, task.tokens_out)
            await ex.close()

    @staticmethod
    def _consume(task: Task, batch: bytes) -> bool:
        """Turn OpenAI SSE events into ``token`` events; True once the stream is over."""
        for event in split_events(batch):
            data = event_data(event)
            if data is None:
                continue
            if data == b"[DONE]":
                return True
            try:
                chunk = _chunk_decoder.decode(data)
            except msgspec.DecodeError:
                continue
            if chunk.error is not None:
                task.fail(
                    _INBAND_CODES.get(str(chunk.error.get("code")), "WORKER_RESET"),
                    str(chunk.error.get("message", "upstream error")),
                    retriable=True,
                )
                return True
            for choice in chunk.choices:
                text = choice.delta.content if choice.delta is not None else choice.text
                if text:
                    task.token(text)
        return False

    def _mark_finished(self, task: Task) -> None:
        if task.finished and task.id not in self._finished:
            self._finished[task.id] = (time.monotonic(), task.event_bytes)
            self._finished_bytes += task.event_bytes
            if self.log is not None and self.log.enabled:
                self.log.write(_task_record(task))
            self._evict()

    def _evict(self) -> None:
        horizon = time.monotonic() - self.config.retention_s
        while self._finished:
            task_id, (finished_at, size) = next(iter(self._finished.items()))
            if (
                finished_at > horizon
                and len(self._finished) <= self.config.max_finished
                and self._finished_bytes <= self.config.max_finished_bytes
            ):
                break
            self._finished.popitem(last=False)
            self._finished_bytes -= size
            self._tasks.pop(task_id, None)

    async def wait_running(self, timeout_s: float) -> None:
        """Let running tasks finish, for at most ``timeout_s`` (graceful shutdown)."""
        runners = [t.runner for t in self._tasks.values() if t.runner and not t.runner.done()]
        if runners and timeout_s > 0:
            await asyncio.wait(runners, timeout=timeout_s)

    async def aclose(self) -> None:
        runners = [t.runner for t in self._tasks.values() if t.runner and not t.runner.done()]
        for runner in runners:
            runner.cancel()
        await asyncio.gather(*runners, return_exceptions=True)
