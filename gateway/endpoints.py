"""The data-plane routes: for each public path, the endpoint it reaches and the rules of
its surface -- which body fields it needs, how its stream ends, whose error envelope it
answers in. Adding a route is an ``Endpoint`` value (``backends.base``), a line here and
the engines that declare it; the exchange (``gateway.exchange``) does the rest.
"""

from __future__ import annotations

import enum

import msgspec

from backends.base import Endpoint
from backends.registry import ENGINES
from gateway.streaming import MESSAGES, OPENAI, RESPONSES, Dialect


class Body(enum.Enum):
    JSON = "json"
    MULTIPART = "multipart"  # audio uploads: multipart/form-data


class Surface(enum.Enum):
    """Whose conventions the route follows: the error envelope, the API-key header."""

    OPENAI = "openai"
    ANTHROPIC = "anthropic"
    WORKER = "worker"  # the OpenVINO worker contract (its own answers, passed through)


class Relay(enum.Enum):
    """How an answer goes back once it has started."""

    WHOLE = "whole"  # read whole, sent with its status (JSON answers)
    EVENTS = "events"  # SSE cut at event boundaries, per the route's dialect (stream: true)
    RAW = "raw"  # bytes as they come: audio, engine-native streams


class Route(msgspec.Struct, frozen=True):
    endpoint: Endpoint
    paths: tuple[str, ...]
    required: tuple[str, ...] = ()  # body fields that must be present and not null ("a|b")
    arrays: tuple[str, ...] = ()  # of those, the ones that must be arrays
    dialect: Dialect | None = None  # streams (``"stream": true``) are SSE in this dialect
    # the gateway may add stream_options.include_usage (OpenAI chat and completions only)
    asks_usage: bool = False
    budgets: tuple[str, ...] = ()  # output-token fields checked against the context
    body: Body = Body.JSON
    surface: Surface = Surface.OPENAI
    always_raw: bool = False  # the answer is relayed raw whatever the body says (audio)
    routed: bool = True  # the body names a model (the worker's jobs do not)


_OPENAI_BUDGETS = ("max_tokens", "max_completion_tokens")

ROUTES: tuple[Route, ...] = (
    Route(
        Endpoint.CHAT,
        ("/v1/chat/completions", "/chat/completions"),
        required=("messages",),
        arrays=("messages",),
        dialect=OPENAI,
        asks_usage=True,
        budgets=_OPENAI_BUDGETS,
    ),
    Route(
        Endpoint.COMPLETIONS,
        ("/v1/completions",),
        required=("prompt",),
        dialect=OPENAI,
        asks_usage=True,
        budgets=_OPENAI_BUDGETS,
    ),
    # llama-server's native /completions (content, tokens, stop; no [DONE]) on llamacpp
    # pools; OpenAI's completions everywhere else
    Route(
        Endpoint.BARE_COMPLETIONS,
        ("/completions",),
        required=("prompt",),
        dialect=OPENAI,
        asks_usage=True,
        budgets=_OPENAI_BUDGETS,
    ),
    Route(Endpoint.EMBEDDINGS, ("/v1/embeddings",), required=("input",)),
    Route(Endpoint.BARE_EMBEDDINGS, ("/embeddings",), required=("input",)),
    Route(
        Endpoint.RESPONSES,
        ("/v1/responses", "/responses"),
        required=("input",),
        dialect=RESPONSES,
        budgets=("max_output_tokens",),
    ),
    Route(
        Endpoint.MESSAGES,
        ("/v1/messages",),
        required=("messages",),
        arrays=("messages",),
        dialect=MESSAGES,
        budgets=("max_tokens",),
        surface=Surface.ANTHROPIC,
    ),
    Route(
        Endpoint.COUNT_TOKENS,
        ("/v1/messages/count_tokens",),
        required=("messages",),
        arrays=("messages",),
        surface=Surface.ANTHROPIC,
    ),
    Route(
        Endpoint.RERANK,
        ("/v1/rerank", "/rerank"),
        required=("query", "documents|texts"),  # TEI's rerank says "texts"
        arrays=("documents", "texts"),
    ),
    Route(Endpoint.TOKENIZE, ("/tokenize",)),
    Route(Endpoint.DETOKENIZE, ("/detokenize",)),
    Route(
        Endpoint.TRANSCRIPTIONS,
        ("/v1/audio/transcriptions", "/audio/transcriptions"),
        required=("file",),
        body=Body.MULTIPART,
        always_raw=True,
    ),
    Route(
        Endpoint.SPEECH,
        ("/v1/audio/speech", "/audio/speech"),
        required=("input",),
        always_raw=True,
    ),
    *(
        Route(endpoint, (endpoint.value,), surface=Surface.WORKER, routed=False)
        for endpoint in (
            Endpoint.WORKER_GENERATE,
            Endpoint.WORKER_MEMORY,
            Endpoint.WORKER_NOTIFICATION,
        )
    ),
)

BY_PATH: dict[str, Route] = {path: route for route in ROUTES for path in route.paths}
# engines' own POST data routes served at the top level too, as one llama-server serves
# them (its /completion, /infill...): every engine's ``native_routes`` marked "post" that
# no route above already is
NATIVE_PATHS = frozenset(
    path
    for engine in ENGINES.values()
    for path, access in engine.native_routes.items()
    if access == "post" and path not in BY_PATH
)
MULTIPART_PATHS = frozenset(
    path for route in ROUTES if route.body is Body.MULTIPART for path in route.paths
)
