"""Benchmark scores an operator supplies, merged into the ranking with a stated weight.

orchgate fetches nothing: the snapshot is a JSON file the operator writes or exports
(a leaderboard's numbers, their own evals), named by ``[catalog] scores_file``::

    {"source": "open-llm-leaderboard 2026-11 export", "scale": 100,
     "models": {"qwen2.5-7b-instruct*": {"chat": 71.2, "overall": 68.0},
                "SmolLM2-135M-Instruct.Q4_1": {"chat": 12.5}}}

A model's entry is its id (case-insensitive) or else the longest glob that matches it;
its score for a job is the job's own, else ``overall``. Among the models that fit, the
order is by ``weight * score / scale + (1 - weight) * speed / fastest``; a model with no
score counts 0 on that side and says so (``score: null``), it is never guessed.
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Annotated

import msgspec
from msgspec import Meta


class ScoreSnapshot(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    source: str  # where the numbers come from: shown beside every score
    models: dict[str, dict[str, float]]  # model id or glob -> job (or "overall") -> score
    scale: Annotated[float, Meta(gt=0)] = 100.0  # the best score possible


def parse_snapshot(raw: bytes) -> ScoreSnapshot:
    """The snapshot, or ``ValueError`` saying what is wrong with it."""
    try:
        snapshot = msgspec.json.decode(raw, type=ScoreSnapshot)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise ValueError(f"not a score snapshot: {exc}") from None
    for pattern, jobs in snapshot.models.items():
        for job, score in jobs.items():
            if not 0 <= score <= snapshot.scale:
                raise ValueError(f"{pattern!r} {job}: {score} is outside 0..{snapshot.scale:g}")
    return snapshot


def score_for(snapshot: ScoreSnapshot, model_id: str, job: str | None) -> float | None:
    """The model's score for ``job`` as a share of the scale (0..1), or None."""
    wanted = model_id.casefold()
    entry = next((v for k, v in snapshot.models.items() if k.casefold() == wanted), None)
    if entry is None:
        globs = [k for k in snapshot.models if fnmatchcase(wanted, k.casefold())]
        if globs:  # the most specific: longest, then code-point order
            entry = snapshot.models[min(globs, key=lambda k: (-len(k), k))]
    if entry is None:
        return None
    score = entry.get(job) if job is not None else None
    if score is None:
        score = entry.get("overall")
    return None if score is None else score / snapshot.scale


def blend(score: float | None, speed: float, fastest: float, weight: float) -> float:
    """The ranking's figure of merit, 0..1."""
    pace = speed / fastest if fastest > 0 else 0.0
    return weight * (score or 0.0) + (1 - weight) * pace
