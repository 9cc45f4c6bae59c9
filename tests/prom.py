"""Scraping the gateway's ``GET /metrics`` the way Prometheus parses it, for assertions."""

from __future__ import annotations

from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families


def scrape(url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    response = httpx.get(url + "/metrics", timeout=5)
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    series: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            series.setdefault(sample.name, []).append((sample.labels, sample.value))
    return series


def value(series: dict[str, Any], name: str, **labels: str) -> float:
    matches = [v for got, v in series[name] if all(got.get(k) == w for k, w in labels.items())]
    assert len(matches) == 1, (name, labels, series.get(name))
    return matches[0]
