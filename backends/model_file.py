"""A model's shape, read from its files: GGUF metadata (through the ``gguf`` package) or a
Hugging Face ``config.json`` for other formats. Feeds the fit estimate (``policies.fit``).

For GGUF the weights are exact (the tensors' own sizes); for ``config.json`` they are
derived from the parameter count the architecture implies and the quantisation it names.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import Any

import msgspec

from backends.gguf_header import GGUFError, read_header

# bits per weight of the formats a config.json names (dtype or quantization_config)
CONFIG_BITS: dict[str, float] = {
    "float32": 32, "float16": 16, "bfloat16": 16, "fp8": 8, "int8": 8,
    "awq": 4.25, "gptq": 4.25, "nvfp4": 4.5, "mxfp4": 4.25, "bitsandbytes": 4.5,
}  # fmt: skip


SHARD_NAME = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf\Z")


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
    # what the files say the model can do (catalog capabilities)
    chat_template: bool = False
    pooling: bool = False  # an embedding (or reranking) model
    vision: bool = False
    experts: int = 0  # mixture of experts: experts per layer, and used per token
    experts_used: int = 0
    expert_bytes: int = 0  # of weights_bytes, the expert tensors' (ffn_*_exps)
    kind: str = "model"  # GGUF general.type: "model", "mmproj", "adapter"

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


@functools.lru_cache(maxsize=256)
def _from_gguf(path: str, size: int, mtime_ns: int) -> ModelShape:
    """Cached by path, size and mtime. Header only (``backends.gguf_header``): no tensor
    data and no tokenizer is read, so a catalog of many files scans in milliseconds."""
    try:
        header = read_header(path)
    except (GGUFError, OSError) as exc:
        raise ModelFileError(str(exc) if str(exc).startswith(path) else f"{path}: {exc}") from None
    fields = header.fields

    def field(key: str, default: Any = None) -> Any:
        return fields.get(key, default)

    arch = field("general.architecture")
    if not isinstance(arch, str):
        raise ModelFileError(f"{path}: GGUF without general.architecture")
    embedding = int(field(f"{arch}.embedding_length", 0))
    heads = _widest(field(f"{arch}.attention.head_count", 1))
    kv_heads = _widest(field(f"{arch}.attention.head_count_kv", heads))
    head_dim = embedding // heads if heads else 0
    vocab = field(f"{arch}.vocab_size") or field("tokenizer.ggml.tokens.len") or 0
    context = field(f"{arch}.context_length")
    tensors, weights = header.tensors, header.data_bytes
    shards = int(field("split.count", 1) or 1)
    if shards > 1:  # the first shard's header describes the model; each holds its tensors
        for other in _sibling_shards(path, shards)[1:]:
            more = read_header(other)
            tensors = [*tensors, *more.tensors]
            weights += more.data_bytes
    return ModelShape(
        source="gguf",
        path=path,
        architecture=arch,
        name=field("general.name"),
        params=sum(t.elements for t in tensors),
        weights_bytes=weights,
        quant=_file_type_name(field("general.file_type")),
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
        chat_template="tokenizer.chat_template" in fields,
        pooling=field(f"{arch}.pooling_type") is not None or arch in _EMBEDDING_ARCHS,
        experts=int(field(f"{arch}.expert_count", 0) or 0),
        experts_used=int(field(f"{arch}.expert_used_count", 0) or 0),
        expert_bytes=sum(t.nbytes() for t in tensors if "_exps" in t.name),
        kind=str(field("general.type", "model")),
    )


# encoder-only architectures llama.cpp serves as embedding (or reranking) models
_EMBEDDING_ARCHS = frozenset({"bert", "nomic-bert", "nomic-bert-moe", "jina-bert-v2", "t5encoder"})


def _file_type_name(file_type: Any) -> str:
    if file_type is None:
        return "unknown"
    from gguf.constants import LlamaFileType

    try:
        return LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_")
    except ValueError:
        return f"file_type {file_type}"


def _sibling_shards(first: str, count: int) -> list[str]:
    """``name-00001-of-00003.gguf`` -> every shard's path, in order."""
    match = SHARD_NAME.match(Path(first).name)
    if match is None:
        return [first]
    stem = match.group("stem")
    return [
        str(Path(first).with_name(f"{stem}-{i:05d}-of-{count:05d}.gguf"))
        for i in range(1, count + 1)
    ]


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
    architecture = str((config.get("architectures") or [config.get("model_type", "?")])[0])
    return ModelShape(
        source="config.json",
        path=str(path),
        architecture=architecture,
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
        chat_template=_has_chat_template(path.parent),
        pooling=_is_encoder(architecture),
        vision="vision_config" in config,
        experts=experts if experts > 1 else 0,
        experts_used=int(config.get("num_experts_per_tok") or 0) if experts > 1 else 0,
        expert_bytes=int(layers * mlp * CONFIG_BITS.get(quant, 16) / 8) if experts > 1 else 0,
    )


def _has_chat_template(folder: Path) -> bool:
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    try:
        tokenizer = msgspec.json.decode((folder / "tokenizer_config.json").read_bytes())
    except (OSError, msgspec.DecodeError):
        return False
    return isinstance(tokenizer, dict) and bool(tokenizer.get("chat_template"))


def _is_encoder(architecture: str) -> bool:
    """Transformers names embedding models ``...Model`` (``BertModel``) or after their
    heads (``...ForSequenceClassification`` rerankers); generators are ``...ForCausalLM``
    or ``...ForConditionalGeneration``."""
    return architecture.endswith(("Model", "ForSequenceClassification", "ForMaskedLM"))


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
