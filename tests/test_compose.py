"""compose.yaml and the files it mounts: valid against the Compose Specification's JSON
schema, every mounted file present and parseable, and the dashboard asking only for series
the gateway really exposes. Docker cannot run here; this is what can be checked without it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema_rs
import yaml

from gateway.config import parse_config
from tests.conftest import REPO, pool
from tests.fakes.servers import wait_until
from tests.prom import scrape

COMPOSE = yaml.safe_load((REPO / "compose.yaml").read_text())
SCHEMA = json.loads((REPO / "tests" / "schemas" / "compose-spec.json").read_text())


def test_compose_file_is_valid_against_the_compose_specification() -> None:
    validator = jsonschema_rs.validator_for(SCHEMA)
    errors = [f"{list(e.instance_path)}: {e.message}" for e in validator.iter_errors(COMPOSE)]
    assert errors == []
    # and the schema really checks: a typo in a service key is caught
    broken = {**COMPOSE, "services": {**COMPOSE["services"], "x": {"imagee": "nope"}}}
    assert not validator.is_valid(broken)


def test_the_stack_has_every_part_with_its_accelerator() -> None:
    services = COMPOSE["services"]
    assert {"orchgate", "llama", "vllm", "npu-worker", "prometheus", "grafana"} <= services.keys()
    gpu = services["vllm"]["deploy"]["resources"]["reservations"]["devices"]
    assert gpu == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert "/dev/accel:/dev/accel" in services["npu-worker"]["devices"]
    for name in ("orchgate", "prometheus", "grafana"):  # published on loopback only
        assert all(p.startswith("127.0.0.1:") for p in services[name]["ports"]), name
    assert (REPO / "Dockerfile").is_file()


def test_the_gpu_override_gives_the_gateway_nvml_and_merges_validly() -> None:
    """``compose.gpu.yaml`` adds the NVIDIA ``utility`` capability (NVML, no compute) to
    the gateway; merged over compose.yaml the stack is still valid."""
    override = yaml.safe_load((REPO / "compose.gpu.yaml").read_text())
    devices = override["services"]["orchgate"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["utility"]}]
    merged = json.loads(json.dumps(COMPOSE))
    merged["services"]["orchgate"].update(override["services"]["orchgate"])
    merged["services"]["orchgate"]["environment"] = {
        **COMPOSE["services"]["orchgate"]["environment"],
        **override["services"]["orchgate"]["environment"],
    }
    validator = jsonschema_rs.validator_for(SCHEMA)
    assert [e.message for e in validator.iter_errors(merged)] == []
    assert validator.is_valid(override)


def _bind_mounts() -> list[tuple[Path, str]]:
    mounts = []
    for service in COMPOSE["services"].values():
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            if source.startswith("./"):
                mounts.append((REPO / source, target))
    return mounts


def test_every_mounted_repo_file_exists_and_parses() -> None:
    mounts = [(source, target) for source, target in _bind_mounts() if "models" not in str(source)]
    assert len(mounts) >= 4
    for source, _ in mounts:
        assert source.exists(), source
    files = [
        p for source, _ in mounts for p in ([source] if source.is_file() else source.rglob("*"))
    ]
    for path in files:
        if path.suffix in (".yml", ".yaml"):
            assert isinstance(yaml.safe_load(path.read_text()), dict), path
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".toml":
            config = parse_config(path.read_text(), env={"ORCHGATE_API_TOKEN": "t"})
            assert config.pools
    assert any(p.suffix == ".json" for p in files), "the Grafana dashboard is mounted"


def test_prometheus_scrapes_orchgate_and_grafana_reads_prometheus() -> None:
    prometheus = yaml.safe_load((REPO / "deploy/prometheus/prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in prometheus["scrape_configs"]}
    assert jobs["orchgate"]["static_configs"][0]["targets"] == ["orchgate:8080"]
    assert jobs["orchgate"]["metrics_path"] == "/metrics"
    orchgate = parse_config(
        (REPO / "deploy/orchgate.toml").read_text(), env={"ORCHGATE_API_TOKEN": "t"}
    )
    assert orchgate.server.bind.endswith(":8080")
    hosts = {r.url.split("//")[1].split(":")[0] for p in orchgate.pools for r in p.replicas}
    assert hosts <= COMPOSE["services"].keys(), "every replica is a compose service"

    datasources = yaml.safe_load(
        (REPO / "deploy/grafana/provisioning/datasources/prometheus.yaml").read_text()
    )["datasources"]
    assert (
        datasources[0]["url"] == "http://prometheus:9090" and datasources[0]["uid"] == "prometheus"
    )
    provider = yaml.safe_load(
        (REPO / "deploy/grafana/provisioning/dashboards/orchgate.yaml").read_text()
    )["providers"][0]
    mounted = dict((target, source) for source, target in _bind_mounts())
    assert mounted[provider["options"]["path"]] == REPO / "deploy/grafana/dashboards"


def test_the_dashboard_asks_only_for_series_the_gateway_exposes(
    fake_upstream: Any, gateway_factory: Any
) -> None:
    dashboard = json.loads((REPO / "deploy/grafana/dashboards/orchgate.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert len(exprs) >= 6
    asked = set()
    for expr in exprs:
        expr = re.sub(r"\bby \([^)]*\)", "", expr)  # grouping labels
        expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
        asked |= set(re.findall(r"\b[a-z_]+\b(?!\s*\()", expr)) - {"m"}  # not functions
    assert {"queue_depth", "tokens_out_total", "gpu_utilization", "vram_used_bytes"} <= asked
    _, server = fake_upstream
    replica = {"id": "g0", "engine": "openai", "url": server.url, "slots": 2}
    with gateway_factory({"pools": [pool("p", ["m"], [replica])]}) as gw:
        assert wait_until(lambda: gw.state.pools["p"].queue.is_ready(), timeout=10)
        gw.state.pools["p"].replicas[0].gpu = _sample()  # as the NVML poller would set it
        exposed = set(scrape(gw.url))
    assert asked <= exposed, asked - exposed


def _sample() -> Any:
    from backends.gpu import GpuSample

    return GpuSample(0, "gpu", 5, 1, 2, 3)


def test_the_standby_overlay_runs_two_gateways_behind_a_ready_check() -> None:
    """``compose.standby.yaml``: a second gateway, Valkey and HAProxy; both gateways read a
    config with ``[cluster]`` and url replicas only; the LB checks ``GET /ready``."""
    overlay = yaml.safe_load((REPO / "compose.standby.yaml").read_text())
    services = overlay["services"]
    assert {"orchgate", "orchgate-b", "valkey", "lb"} <= services.keys()
    merged = json.loads(json.dumps(COMPOSE))
    for name, service in services.items():
        base = merged["services"].setdefault(name, {})
        base.update({k: v for k, v in service.items() if k != "environment"})
        base["environment"] = {**base.get("environment", {}), **service.get("environment", {})}
    validator = jsonschema_rs.validator_for(SCHEMA)
    assert [e.message for e in validator.iter_errors(merged)] == []
    for name in ("orchgate", "orchgate-b"):
        (volume,) = services[name]["volumes"]
        source = REPO / volume.split(":")[0]
        config = parse_config(source.read_text(), env={"ORCHGATE_API_TOKEN": "t"})
        assert config.cluster is not None and config.cluster.mode == "standby"
        assert services[name]["environment"]["ORCHGATE_CLUSTER_URL"] == "redis://valkey:6379/0"
    haproxy = (REPO / "deploy" / "haproxy.cfg").read_text()
    assert "option httpchk GET /ready" in haproxy and "orchgate-b:8080 check" in haproxy
    assert all(p.startswith("127.0.0.1:") for p in services["lb"]["ports"])
    assert "noeviction" in services["valkey"]["command"]


def test_the_active_overlay_makes_both_gateways_serve() -> None:
    """``compose.active.yaml`` over the standby overlay: both gateways read a config in
    ``active`` mode (same pools, url replicas only); everything else is the standby's."""
    overlay = yaml.safe_load((REPO / "compose.active.yaml").read_text())
    standby = yaml.safe_load((REPO / "compose.standby.yaml").read_text())["services"]
    assert set(overlay["services"]) == {"orchgate", "orchgate-b"}
    for name, service in overlay["services"].items():
        (volume,) = service["volumes"]
        source, target = volume.split(":")[:2]
        assert target == standby[name]["volumes"][0].split(":")[1]  # replaces that mount
        config = parse_config((REPO / source).read_text(), env={"ORCHGATE_API_TOKEN": "t"})
        assert config.cluster is not None and config.cluster.mode == "active"
        twin = parse_config((REPO / "deploy/orchgate-cluster.toml").read_text(),
                            env={"ORCHGATE_API_TOKEN": "t"})  # fmt: skip
        assert config.pools == twin.pools
