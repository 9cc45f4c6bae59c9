"""bench.peers' profile guards: issue 15's targets, judged against nginx and direct from the
same run (the function only: the benchmark itself is not a test)."""

from __future__ import annotations

from typing import Any

from bench.peers import guards


def _summary(cpu_req: float, p50: float, cpu_event: float, events_x: float, gap: float) -> Any:
    def stream(x: float, gap_ms: float, cpu: float, bad: int = 0) -> dict[str, Any]:
        return {"events_x_direct": x, "added_gap_p99_ms": gap_ms, "cpu_us_per_event": cpu,
                "bad_streams": bad}  # fmt: skip

    return {
        "ns_c32": {"orchgate": {"cpu_us_per_req": cpu_req}, "nginx": {"cpu_us_per_req": 10.0}},
        "ns_c1": {"orchgate": {"added_p50_ms": p50}},
        "st_256": {"orchgate": stream(events_x, gap, cpu_event), "nginx": stream(1.0, 1.0, 10.0)},
        "st_1024": {"orchgate": stream(0.5, -90, cpu_event, bad=1), "nginx": stream(0.5, -90, 10)},
    }


def test_each_guard_is_judged_against_the_same_run() -> None:
    met = {g.name: g.met for g in guards(_summary(40.0, 0.09, 15.0, 0.995, 1.4), 58.0)}
    assert met == {
        "CPU per request": True,
        "added p50 at c=1": True,
        "256 streams: lost or merged": True,
        "256 streams: CPU per event": True,
        "256 streams: events/s": True,
        "256 streams: added gap p99": True,
        "1024 streams: lost or merged": False,  # one bad stream is a miss
        "1024 streams: CPU per event": True,
        "idle RSS": True,
    }  # at 1,024 streams events/s and gaps are the load generator's: not judged


def test_a_miss_by_a_hair_is_a_miss() -> None:
    checked = guards(_summary(40.1, 0.101, 15.1, 0.989, 1.51), 60.1)
    missed = {g.name for g in checked if not g.met}
    assert missed == {
        "CPU per request",
        "added p50 at c=1",
        "256 streams: CPU per event",
        "256 streams: events/s",
        "256 streams: added gap p99",
        "1024 streams: lost or merged",
        "1024 streams: CPU per event",
        "idle RSS",
    }
