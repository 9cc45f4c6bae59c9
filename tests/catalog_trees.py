"""Model folders for the catalog tests, built from the real SmolLM2 GGUF: copies and hard
links under other names, a truncated copy, an engine-refused copy, small GGUF shards, a
Hugging Face cache tree and ``config.json``-only folders."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import msgspec

SMALL_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 576,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "intermediate_size": 1536,
    "vocab_size": 49152,
    "max_position_embeddings": 8192,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
}


def link_or_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)  # no extra disk: same inode, another name
    except OSError:
        shutil.copyfile(source, target)


def truncated_copy(source: Path, target: Path, keep: int = 4 * 1024 * 1024) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with source.open("rb") as src, target.open("wb") as dst:
        dst.write(src.read(keep))


def refused_copy(source: Path, target: Path) -> None:
    """A GGUF whose header reads fine but whose architecture no llama-server knows: the
    engine exits at load ("unknown model architecture"), as a damaged model would."""
    target.parent.mkdir(parents=True, exist_ok=True)
    data = bytearray(source.read_bytes())
    marker = b"general.architecture"
    at = data.index(marker) + len(marker) + 4 + 8  # key, value type (u32), length (u64)
    assert data[at : at + 5] == b"llama"
    data[at : at + 5] = b"lxama"
    target.write_bytes(bytes(data))


def tiny_gguf(path: Path, *, split: tuple[int, int] | None = None, kind: str = "model") -> None:
    """A small valid GGUF (one tensor), optionally one shard of a split model."""
    import numpy as np
    from gguf import GGUFWriter

    path.parent.mkdir(parents=True, exist_ok=True)
    writer = GGUFWriter(str(path), arch="llama")
    writer.add_type(kind)
    writer.add_block_count(1)
    writer.add_context_length(2048)
    writer.add_embedding_length(64)
    writer.add_head_count(4)
    if split is not None:
        no, count = split
        writer.add_uint16("split.no", no - 1)
        writer.add_uint16("split.count", count)
    writer.add_tensor("blk.0.w", np.ones((64, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def hf_cache_repo(root: Path, repo: str, files: dict[str, bytes], *, partial: bool = False) -> Path:
    """``models--org--name`` as ``huggingface-cli download`` leaves it: blobs, a snapshot
    of symlinks to them, and ``refs/main``."""
    folder = root / ("models--" + repo.replace("/", "--"))
    revision = "0123456789abcdef0123456789abcdef01234567"
    snapshot = folder / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (folder / "blobs").mkdir()
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(revision)
    for i, (name, data) in enumerate(files.items()):
        blob = folder / "blobs" / f"{i:040x}"
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    if partial:
        (folder / "blobs" / ("f" * 40 + ".incomplete")).write_bytes(b"half")
    return snapshot


def config_folder(path: Path, config: dict[str, object] | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_bytes(msgspec.json.encode(config or SMALL_CONFIG))
    return path
