"""The worker's jobs: prompts, output targets, token defaults and input bounds. Pure."""

from __future__ import annotations

import enum

import msgspec

MAX_INPUT_CHARS = 6000
MAX_NEW_TOKENS = 256


class Job(enum.StrEnum):
    TITLE = "title"
    SUMMARY = "summary"
    NOTIFICATION = "notification"
    MEMORY_CANDIDATE = "memory_candidate"


ALIASES = {"memory": Job.MEMORY_CANDIDATE}

DEFAULT_MAX_NEW_TOKENS = {
    Job.TITLE: 32,
    Job.SUMMARY: 160,
    Job.NOTIFICATION: 96,
    Job.MEMORY_CANDIDATE: 192,
}

JSON_JOBS = frozenset({Job.NOTIFICATION, Job.MEMORY_CANDIDATE})

SYSTEM_PROMPTS = {
    Job.TITLE: "Write one title of 8 words or fewer for the text. Reply with the title only.",
    Job.SUMMARY: "Summarise the text in one short paragraph or up to 4 bullet points.",
    Job.NOTIFICATION: (
        "Condense the alert into a JSON object with the keys severity, category, summary and "
        "action_needed. Reply with the JSON object only."
    ),
    Job.MEMORY_CANDIDATE: (
        "Extract facts worth remembering from the conversation as a JSON object with the keys "
        '"candidates" (a list of short strings) and "notes". Reply with the JSON object only.'
    ),
}


class InvalidJob(ValueError):
    """A request outside the contract's bounds; the message says which bound."""


def resolve_job(name: object) -> Job:
    if not isinstance(name, str):
        raise InvalidJob("job must be one of " + ", ".join(j.value for j in Job))
    job_name = ALIASES.get(name, name)
    try:
        return Job(job_name)
    except ValueError:
        raise InvalidJob(
            f"unsupported job {name!r}; expected one of " + ", ".join(j.value for j in Job)
        ) from None


def check_input(text: object) -> str:
    if not isinstance(text, str) or not text.strip():
        raise InvalidJob("input must be a non-empty string")
    if len(text) > MAX_INPUT_CHARS:
        raise InvalidJob(f"input has {len(text)} characters; the limit is {MAX_INPUT_CHARS}")
    return text


def check_max_new_tokens(value: object, default: int, *, name: str = "max_new_tokens") -> int:
    """``name``: the field as the client spelled it (OpenAI routes say ``max_tokens``)."""
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidJob(f"{name} must be an integer")
    if not 1 <= value <= MAX_NEW_TOKENS:
        raise InvalidJob(f"{name} must be between 1 and {MAX_NEW_TOKENS} on this worker")
    return value


_decoder = msgspec.json.Decoder()


def parse_json_output(text: str) -> object | None:
    """The first JSON object in the model's text, or ``None`` when there is none."""
    start = text.find("{")
    while start >= 0:
        depth = 0
        for end in range(start, len(text)):
            if text[end] == "{":
                depth += 1
            elif text[end] == "}":
                depth -= 1
                if depth == 0:
                    try:
                        parsed = _decoder.decode(text[start : end + 1])
                    except msgspec.DecodeError:
                        break
                    return parsed if isinstance(parsed, dict) else None
        start = text.find("{", start + 1)
    return None
