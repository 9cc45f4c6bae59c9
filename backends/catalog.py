"""Which models are on disk: the catalog's discovery, one scan of the configured folders.

Recognised, at any depth below a folder (symlinks to files followed, to folders not):

* GGUF files; ``name-00001-of-00003.gguf`` shards are one model (all shards present, else
  skipped); ``mmproj*.gguf`` beside a model is its vision tower, not a model;
* Hugging Face cache repos (``models--org--name/snapshots/<rev>/``, what
  ``huggingface-cli download`` leaves): the revision ``refs/main`` names, else the newest;
  its GGUF files are models of their own, a ``config.json`` makes the repo one model;
* plain folders with ``config.json`` (transformers / vLLM) or ``openvino_model.xml``
  (OpenVINO IR).

Partial downloads (``*.incomplete``, ``*.part``, ``*.download``, dangling symlinks, missing
shards) are skipped with a reason, never raised. A file whose header cannot be read is
still listed, with ``error`` set, so that the operator sees it. Never raises for what it
finds on disk; a missing folder is a problem entry.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import msgspec

from backends.model_file import SHARD_NAME, ModelFileError, ModelShape, read_model

PARTIAL_SUFFIXES = (".incomplete", ".part", ".partial", ".download", ".tmp", ".crdownload")
_MAX_DEPTH = 8
_ID_UNSAFE = re.compile(r"[^A-Za-z0-9._:/-]+")


class CatalogEntry(msgspec.Struct, frozen=True):
    """One model found on disk."""

    id: str  # stable: from the file or repo name, never from its content
    path: str  # what an engine is given: the file (first shard) or the folder
    format: str  # "gguf" | "transformers" | "openvino"
    size_bytes: int  # on disk, every shard and weight file together
    shape: ModelShape | None = None
    mmproj: str | None = None  # a vision tower file beside a GGUF model
    shards: int = 1
    error: str | None = None  # the metadata could not be read (a damaged file)

    @property
    def name(self) -> str:
        """The file or folder name recipes match their globs against."""
        return Path(self.path).name

    def capabilities(self) -> list[str]:
        shape = self.shape
        found: list[str] = []
        if shape is not None and shape.pooling:
            found.append("embeddings")
        elif shape is not None and shape.chat_template:
            found += ["chat", "completions"]
        elif shape is not None:
            found.append("completions")
        if self.mmproj is not None or (shape is not None and shape.vision):
            found.append("vision")
        return found


class Skipped(msgspec.Struct, frozen=True):
    path: str
    reason: str


class Discovery(msgspec.Struct, frozen=True):
    models: list[CatalogEntry]
    skipped: list[Skipped]


def discover(dirs: Sequence[str]) -> Discovery:
    found: dict[str, CatalogEntry] = {}
    skipped: list[Skipped] = []
    for folder in dirs:
        root = Path(folder).expanduser()
        if not root.is_dir():
            skipped.append(Skipped(str(root), "not a folder (catalog.dirs)"))
            continue
        for entry in _scan(root, skipped):
            if entry.id in found:  # the same name twice: keep the first, say so
                skipped.append(
                    Skipped(entry.path, f"duplicate id {entry.id!r} ({found[entry.id].path})")
                )
                continue
            found[entry.id] = entry
    models = sorted(found.values(), key=lambda e: e.id)
    return Discovery(models=models, skipped=skipped)


def _scan(root: Path, skipped: list[Skipped]) -> Iterable[CatalogEntry]:
    stack = [(root, 0)]
    while stack:
        folder, depth = stack.pop()
        try:
            children = sorted(folder.iterdir())
        except OSError as exc:
            skipped.append(Skipped(str(folder), f"unreadable: {exc.strerror or exc}"))
            continue
        names = {c.name for c in children}
        if folder.name.startswith("models--") and "snapshots" in names:
            yield from _hf_repo(folder, skipped)
            continue
        if "config.json" in names or "openvino_model.xml" in names:
            entry = _model_folder(folder, folder.name, skipped)
            if entry is not None:
                yield entry
                continue
        yield from _ggufs(folder, children, skipped, id_prefix="")
        if depth < _MAX_DEPTH:
            for child in reversed(children):
                if child.is_dir() and not child.is_symlink() and not child.name.startswith("."):
                    stack.append((child, depth + 1))


def _ggufs(
    folder: Path, children: list[Path], skipped: list[Skipped], *, id_prefix: str
) -> Iterable[CatalogEntry]:
    files = [c for c in children if c.name.lower().endswith(".gguf")]
    for partial in (c for c in children if c.name.lower().endswith(PARTIAL_SUFFIXES)):
        skipped.append(Skipped(str(partial), "partial download"))
    towers = [f for f in files if f.name.lower().startswith("mmproj")]
    shard_sets: dict[str, list[tuple[int, int, Path]]] = {}
    for file in files:
        if file in towers:
            continue
        if not file.exists():
            skipped.append(Skipped(str(file), "dangling symlink (an unfinished download)"))
            continue
        match = SHARD_NAME.match(file.name)
        if match is not None:
            shard_sets.setdefault(match.group("stem"), []).append(
                (int(match.group("no")), int(match.group("count")), file)
            )
            continue
        yield _gguf_entry(id_prefix + file.name.removesuffix(".gguf").removesuffix(".GGUF"),
                          [file], towers)  # fmt: skip
    for stem, shards in shard_sets.items():
        count = shards[0][1]
        present = {no for no, _, _ in shards}
        missing = sorted(set(range(1, count + 1)) - present)
        if missing or any(c != count for _, c, _ in shards):
            skipped.append(
                Skipped(str(folder / stem), f"incomplete shards: missing {missing} of {count}")
            )
            continue
        ordered = [path for _, _, path in sorted(shards)]
        yield _gguf_entry(id_prefix + stem, ordered, towers)


def _gguf_entry(model_id: str, files: list[Path], towers: list[Path]) -> CatalogEntry:
    size = sum(_size(f) for f in files)
    shape, error = None, None
    try:
        shape = read_model(files[0])
    except ModelFileError as exc:
        error = str(exc)
    except Exception as exc:  # noqa: BLE001 -- a damaged file must never stop the scan
        error = f"{files[0]}: unreadable ({type(exc).__name__}: {exc})"
    if shape is not None and shape.kind not in ("model", ""):
        error = f"{files[0]}: a GGUF {shape.kind!r}, not a model"
    return CatalogEntry(
        id=_safe_id(model_id),
        path=str(files[0]),
        format="gguf",
        size_bytes=size,
        shape=shape,
        mmproj=str(towers[0]) if towers else None,
        shards=len(files),
        error=error,
    )


def _model_folder(folder: Path, model_id: str, skipped: list[Skipped]) -> CatalogEntry | None:
    """A transformers / vLLM folder (``config.json``) or OpenVINO IR; None when it holds
    neither weights nor an IR (a config-only folder is still a model: listed, and a recipe
    decides whether an engine can use it)."""
    files = [f for f in folder.iterdir() if f.is_file() or f.is_symlink()]
    dangling = [f for f in files if f.is_symlink() and not f.exists()]
    partial = [f for f in files if f.name.endswith(PARTIAL_SUFFIXES)]
    if dangling or partial:
        skipped.append(
            Skipped(str(folder), f"partial download: {(dangling or partial)[0].name} is unfinished")
        )
        return None
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        missing = _missing_weight_files(folder, index)
        if missing:
            skipped.append(Skipped(str(folder), f"incomplete shards: missing {missing[:3]}"))
            return None
    is_ir = (folder / "openvino_model.xml").is_file()
    shape, error = None, None
    if (folder / "config.json").is_file():
        try:
            shape = read_model(folder / "config.json")
        except ModelFileError as exc:
            error = str(exc)
    return CatalogEntry(
        id=_safe_id(model_id),
        path=str(folder),
        format="openvino" if is_ir else "transformers",
        size_bytes=sum(_size(f) for f in files),
        shape=shape,
        error=error,
    )


def _missing_weight_files(folder: Path, index: Path) -> list[str]:
    try:
        weight_map = msgspec.json.decode(index.read_bytes()).get("weight_map", {})
    except (OSError, msgspec.DecodeError, AttributeError):
        return [index.name]
    return sorted({str(f) for f in weight_map.values() if not (folder / str(f)).exists()})


def _hf_repo(repo: Path, skipped: list[Skipped]) -> Iterable[CatalogEntry]:
    """``models--org--name``: the snapshot ``refs/main`` names, else the newest one."""
    _, _, rest = repo.name.partition("models--")
    repo_id = rest.replace("--", "/")
    blobs = repo / "blobs"
    if blobs.is_dir() and any(b.name.endswith(".incomplete") for b in blobs.iterdir()):
        skipped.append(Skipped(str(repo), "partial download (blobs/*.incomplete)"))
        return
    snapshots = repo / "snapshots"
    revision = None
    ref = repo / "refs" / "main"
    if ref.is_file():
        revision = ref.read_text().strip()
    candidates = sorted(
        (s for s in snapshots.iterdir() if s.is_dir()), key=lambda s: s.stat().st_mtime
    )
    chosen = snapshots / revision if revision and (snapshots / revision).is_dir() else None
    if chosen is None and candidates:
        chosen = candidates[-1]
    if chosen is None:
        skipped.append(Skipped(str(repo), "no snapshot"))
        return
    children = sorted(chosen.iterdir())
    if (chosen / "config.json").exists() or (chosen / "openvino_model.xml").exists():
        entry = _model_folder(chosen, repo_id, skipped)
        if entry is not None:
            yield entry
        return
    yield from _ggufs(chosen, children, skipped, id_prefix=f"{repo_id}:")


def _size(path: Path) -> int:
    try:
        return os.stat(path).st_size  # follows the HF cache's symlinks to blobs
    except OSError:
        return 0


def _safe_id(raw: str) -> str:
    return _ID_UNSAFE.sub("-", raw).strip("-") or "model"
