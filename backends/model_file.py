"""A model's shape, read from its files: GGUF metadata (through the ``gguf`` package) or a
Hugging Face ``config.json`` for other formats. Feeds the fit estimate (``policies.fit``).

For GGUF the weights are exact (the tensors' own sizes); for ``config.json`` they are
derived from the parameter count the architecture implies and the quantisation it names.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import msgspec

# bits per weight of the formats a config.json names (dtype or quantization_config)
CONFIG_BITS: dict[str, float] = {
    "float32": 32, "float16": 16, "bfloat16": 16, "fp8": 8, "int8": 8,
    "awq": 4.25, "gptq": 4.25, "nvfp4": 4.5, "mxfp4": 4.25, "bitsandbytes": 4.5,
}  # fmt: skip


class ModelFileError(Exception):
    """The file is missing or is not a model this module can read."""


class ModelShape(msgspec.Struct, frozen=True):
    source: str  # "gguf" | "config.json"
    path: str
    architecture: str
    name: str | None
    params: int
    weights_bytes: int
    quant: str
    layers: int
    embedding: int
    feed_forward: int
    heads: int
    kv_heads: int
    key_length: int
    value_length: int
    vocab: int
    context_train: int | None
    file_bytes: int | None

    @property
    def bits_per_weight(self) -> float:
        return self.weights_bytes * 8 / self.params if self.params else 0.0


def read_model(path: str | os.PathLike[str]) -> ModelShape:
    """A ``.gguf`` file, a ``config.json``, or a directory holding one of them."""
    p = Path(path)
    if p.is_dir():
        ggufs = sorted(p.glob("*.gguf"))
        if (p / "config.json").is_file():
            p = p / "config.json"
        elif ggufs:
            p = ggufs[0]
        else:
            raise ModelFileError(f"{path}: no config.json or .gguf file in this directory")
    if not p.is_file():
        raise ModelFileError(f"{path}: no such file")
    if p.name.endswith(".json"):
        return _from_config(p)
    stat = p.stat()
    return _from_gguf(str(p.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _from_gguf(path: str, size: int, mtime_ns: int) -> ModelShape:
    """Cached by path, size and mtime: opening a GGUF parses its whole tokenizer (seconds)."""
    import gguf  # heavy (numpy); only the fit check and ``orchgate fit`` need it

    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as exc:
        raise ModelFileError(f"{path}: not a readable GGUF file: {exc}") from None

    def field(key: str, default: Any = None) -> Any:
        f = reader.fields.get(key)
        if f is None:
            return default
        value = f.contents()
        return value

    arch = field("general.architecture")
    if not isinstance(arch, str):
        raise ModelFileError(f"{path}: GGUF without general.architecture")
    embedding = int(field(f"{arch}.embedding_length", 0))
    heads = _widest(field(f"{arch}.attention.head_count", 1))
    kv_heads = _widest(field(f"{arch}.attention.head_count_kv", heads))
    head_dim = embedding // heads if heads else 0
    file_type = field("general.file_type")
    try:
        quant = (
            gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_")
            if file_type is not None
            else "unknown"
        )
    except ValueError:
        quant = f"file_type {file_type}"
    vocab = field(f"{arch}.vocab_size")
    if vocab is None:
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        vocab = len(tokens.data) if tokens is not None else 0
    context = field(f"{arch}.context_length")
    return ModelShape(
        source="gguf",
        path=path,
        architecture=arch,
        name=field("general.name"),
        params=sum(int(t.n_elements) for t in reader.tensors),
        weights_bytes=sum(int(t.n_bytes) for t in reader.tensors),
        quant=quant,
        layers=int(field(f"{arch}.block_count", 0)),
        embedding=embedding,
        feed_forward=_widest(field(f"{arch}.feed_forward_length", 0)),
        heads=heads,
        kv_heads=kv_heads,
        key_length=int(field(f"{arch}.attention.key_length", head_dim)),
        value_length=int(field(f"{arch}.attention.value_length", head_dim)),
        vocab=int(vocab),
        context_train=int(context) if context is not None else None,
        file_bytes=size,
    )


def _widest(value: Any) -> int:
    """Per-layer arrays (some architectures vary heads by layer): the largest entry."""
    if isinstance(value, list):
        return int(max(value)) if value else 0
    return int(value)


def _from_config(path: Path) -> ModelShape:
    try:
        config = msgspec.json.decode(path.read_bytes())
    except (OSError, msgspec.DecodeError) as exc:
        raise ModelFileError(f"{path}: not a readable config.json: {exc}") from None
    if not isinstance(config, dict):
        raise ModelFileError(f"{path}: config.json is not an object")
    config = {**config.get("text_config", {}), **config}  # multimodal: the language model
    try:
        hidden = int(config["hidden_size"])
        layers = int(config["num_hidden_layers"])
        heads = int(config["num_attention_heads"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelFileError(f"{path}: config.json lacks {exc}") from None
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    ff = int(config.get("intermediate_size") or 4 * hidden)
    vocab = int(config.get("vocab_size") or 32000)
    experts = int(config.get("num_local_experts") or config.get("num_experts") or 1)
    expert_ff = int(config.get("moe_intermediate_size") or ff)
    attention = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2
    mlp = 3 * hidden * (expert_ff * experts if experts > 1 else ff)
    embeddings = vocab * hidden * (1 if config.get("tie_word_embeddings") else 2)
    params = layers * (attention + mlp) + embeddings
    quant = _config_quant(config)
    return ModelShape(
        source="config.json",
        path=str(path),
        architecture=str((config.get("architectures") or [config.get("model_type", "?")])[0]),
        name=config.get("_name_or_path"),
        params=params,
        weights_bytes=int(params * CONFIG_BITS.get(quant, 16) / 8),
        quant=quant,
        layers=layers,
        embedding=hidden,
        feed_forward=ff,
        heads=heads,
        kv_heads=kv_heads,
        key_length=head_dim,
        value_length=head_dim,
        vocab=vocab,
        context_train=config.get("max_position_embeddings"),
        file_bytes=None,
    )


def _config_quant(config: dict[str, Any]) -> str:
    quantization = config.get("quantization_config")
    if isinstance(quantization, dict):
        method = str(quantization.get("quant_method", "")).lower()
        if method in CONFIG_BITS:
            return method
        if quantization.get("bits") == 8 or "fp8" in method:
            return "fp8"
        return method or "int8"
    return str(config.get("torch_dtype") or config.get("dtype") or "bfloat16")
