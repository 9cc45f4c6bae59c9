"""The catalog without engines: discovery on real trees (the real SmolLM2 GGUF under other
names, shards, a Hugging Face cache, config.json folders, partial downloads), recipes,
the header-only GGUF reader against the ``gguf`` package, and the residency planner."""

from __future__ import annotations

from pathlib import Path

import pytest

from backends.catalog import CatalogEntry, discover
from backends.gguf_header import GGUFError, read_header
from backends.model_file import read_model
from policies.recipes import RecipeConfig, match_recipe, render, suggested_flags
from policies.residency import Resident, Verdict, choose_device, plan_room
from tests import catalog_trees as trees
from tests.conftest import test_assets

MIB = 1024**2


@pytest.fixture(scope="module")
def smollm2() -> Path:
    return test_assets.smollm2_model()


def test_header_reader_agrees_with_the_gguf_package(smollm2: Path) -> None:
    from gguf import GGUFReader

    header = read_header(smollm2)
    reader = GGUFReader(str(smollm2))
    assert len(header.tensors) == len(reader.tensors)
    assert sum(t.elements for t in header.tensors) == sum(int(t.n_elements) for t in reader.tensors)
    assert header.data_bytes == sum(int(t.n_bytes) for t in reader.tensors)
    assert header.fields["general.architecture"] == "llama"
    assert header.fields["tokenizer.ggml.tokens.len"] == 49152
    shape = read_model(smollm2)
    assert shape.chat_template and not shape.pooling and shape.context_train == 8192


def test_truncated_and_foreign_files_raise_not_crash(smollm2: Path, tmp_path: Path) -> None:
    trees.truncated_copy(smollm2, tmp_path / "cut.gguf")
    with pytest.raises(GGUFError, match="truncated"):
        read_header(tmp_path / "cut.gguf")
    (tmp_path / "text.gguf").write_text("not a model at all, just text")
    with pytest.raises(GGUFError, match="not a GGUF"):
        read_header(tmp_path / "text.gguf")
    trees.truncated_copy(smollm2, tmp_path / "head.gguf", keep=100)
    with pytest.raises(GGUFError):
        read_header(tmp_path / "head.gguf")


def _tree(root: Path, smollm2: Path) -> None:
    trees.link_or_copy(smollm2, root / "chat" / "SmolLM2-135M-Instruct.Q4_1.gguf")
    trees.link_or_copy(smollm2, root / "chat" / "smol-copy.gguf")
    trees.tiny_gguf(root / "chat" / "mmproj-smol-f16.gguf", kind="mmproj")
    trees.truncated_copy(smollm2, root / "broken" / "broken.gguf")
    trees.tiny_gguf(root / "split" / "big-00001-of-00002.gguf", split=(1, 2))
    trees.tiny_gguf(root / "split" / "big-00002-of-00002.gguf", split=(2, 2))
    trees.tiny_gguf(root / "split" / "half-00001-of-00003.gguf", split=(1, 3))
    (root / "downloading").mkdir()
    (root / "downloading" / "next.gguf.incomplete").write_bytes(b"GGUF")
    hub = root / "hub"
    files = {
        "config.json": trees.msgspec.json.encode(trees.SMALL_CONFIG),
        "tokenizer_config.json": b'{"chat_template": "{{ messages }}"}',
    }
    trees.hf_cache_repo(hub, "HuggingFaceTB/SmolLM2-135M-Instruct", files)
    trees.hf_cache_repo(hub, "someone/half-done", {"config.json": b"{}"}, partial=True)
    trees.config_folder(root / "vllm" / "Qwen-like")
    trees.config_folder(
        root / "vllm" / "bge-small",
        {"architectures": ["BertModel"], "hidden_size": 384, "num_hidden_layers": 12,
         "num_attention_heads": 12, "vocab_size": 30522},
    )  # fmt: skip
    ir = root / "npu" / "smol-ov"
    trees.config_folder(ir)
    (ir / "openvino_model.xml").write_text("<net/>")


def test_discovery_finds_every_kind_and_skips_partials(smollm2: Path, tmp_path: Path) -> None:
    _tree(tmp_path, smollm2)
    found = discover([str(tmp_path), str(tmp_path / "nowhere")])
    by_id = {m.id: m for m in found.models}
    assert sorted(by_id) == sorted([
        "SmolLM2-135M-Instruct.Q4_1", "smol-copy", "broken", "big",
        "HuggingFaceTB/SmolLM2-135M-Instruct", "Qwen-like", "bge-small", "smol-ov",
    ])  # fmt: skip
    smol = by_id["SmolLM2-135M-Instruct.Q4_1"]
    assert smol.format == "gguf" and smol.size_bytes == smollm2.stat().st_size
    assert smol.shape is not None and smol.shape.quant == "Q4_1" and smol.shape.params > 1e8
    assert smol.mmproj is not None and smol.mmproj.endswith("mmproj-smol-f16.gguf")
    assert smol.capabilities() == ["chat", "completions", "vision"]
    assert by_id["broken"].error is not None and "truncated" in by_id["broken"].error
    big = by_id["big"]
    assert big.shards == 2 and big.path.endswith("big-00001-of-00002.gguf")
    assert big.shape is not None and big.shape.params == 2 * 64 * 64  # both shards' tensors
    hf = by_id["HuggingFaceTB/SmolLM2-135M-Instruct"]
    assert hf.format == "transformers" and "snapshots" in hf.path
    assert hf.shape is not None and hf.shape.chat_template
    assert by_id["bge-small"].capabilities() == ["embeddings"]
    assert by_id["smol-ov"].format == "openvino"
    reasons = {Path(s.path).name: s.reason for s in found.skipped}
    assert "incomplete shards" in reasons["half"] and "[2, 3]" in reasons["half"]
    assert reasons["next.gguf.incomplete"] == "partial download"
    assert "partial download" in reasons["models--someone--half-done"]
    assert "not a folder" in reasons["nowhere"]
    assert not any("mmproj" in m.path for m in found.models)


def test_recipes_match_by_glob_and_format_and_render_placeholders(smollm2: Path) -> None:
    entry = CatalogEntry(id="smol", path=str(smollm2), format="gguf", size_bytes=1)
    recipes = [
        RecipeConfig(engine="vllm", match="*", format="transformers", launch=["vllm", "{port}"]),
        RecipeConfig(
            engine="llamacpp", match="smollm2-*.GGUF",
            launch=["llama-server", "-m", "{model_path}", "--port", "{port}", "-c", "{ctx}",
                    "--mmproj", "{mmproj}", "--tag={id}"],
        ),
    ]  # fmt: skip
    recipe = match_recipe(entry, recipes)
    assert recipe is recipes[1]  # case-insensitive glob on the file name
    values = {"model_path": str(smollm2), "port": "9", "ctx": "512", "mmproj": "", "id": "smol"}
    argv = render(recipe.launch, values)
    # a placeholder without a value drops its argument and the flag before it
    assert argv == ["llama-server", "-m", str(smollm2), "--port", "9", "-c", "512", "--tag=smol"]
    other = CatalogEntry(id="x", path="/m/other.bin", format="gguf", size_bytes=1)
    assert match_recipe(other, recipes) is None


def test_needs_setup_suggests_flags_from_metadata(smollm2: Path, tmp_path: Path) -> None:
    _tree(tmp_path, smollm2)
    by_id = {m.id: m for m in discover([str(tmp_path)]).models}
    flags = suggested_flags(by_id["SmolLM2-135M-Instruct.Q4_1"])
    assert flags[:3] == ["llama-server", "-m", "{model_path}"]
    assert "-c" in flags and flags[flags.index("-c") + 1] == "8192"
    assert "--mmproj" in flags
    assert "--max-model-len" in suggested_flags(by_id["Qwen-like"])
    assert "embed" in suggested_flags(by_id["bge-small"])


def test_room_is_made_least_recently_used_first_and_never_from_pinned() -> None:
    idle_old = Resident("a", "cpu", 400 * MIB, last_used=1.0)
    idle_new = Resident("b", "cpu", 400 * MIB, last_used=5.0)
    busy = Resident("c", "cpu", 400 * MIB, last_used=0.5, busy=True)
    pinned = Resident("p", "cpu", 400 * MIB, last_used=0.1, pinned=True)
    budget = 1600 * MIB
    assert plan_room(300 * MIB, "cpu", 2000 * MIB, [idle_old]).verdict is Verdict.FITS
    plan = plan_room(500 * MIB, "cpu", budget, [idle_old, idle_new, busy, pinned])
    assert plan.verdict is Verdict.MAKE_ROOM and plan.evict == ["a", "b"] and plan.drain == []
    plan = plan_room(1100 * MIB, "cpu", budget, [idle_old, idle_new, busy, pinned])
    assert plan.evict == ["a", "b"] and plan.drain == ["c"]  # busy ones only when needed
    plan = plan_room(1300 * MIB, "cpu", budget, [idle_old, idle_new, busy, pinned])
    assert plan.verdict is Verdict.IMPOSSIBLE and "pinned" in plan.reason
    assert plan_room(2000 * MIB, "cpu", budget, []).verdict is Verdict.IMPOSSIBLE
    # the count bound: room on another device does not help, the count does
    gpu = Resident("g", "cuda:0", 100 * MIB, last_used=0.0)
    plan = plan_room(100 * MIB, "cpu", budget, [idle_new, gpu], max_loaded=2)
    assert plan.verdict is Verdict.MAKE_ROOM and plan.evict == ["g"]


def test_device_choice_prefers_the_least_loaded_gpu_that_fits() -> None:
    budgets = {"cuda:0": 1000 * MIB, "cuda:1": 1000 * MIB}
    residents = [Resident("a", "cuda:0", 600 * MIB, 1.0), Resident("b", "cuda:1", 200 * MIB, 1.0)]
    assert choose_device(300 * MIB, budgets, residents).device == "cuda:1"
    plan = choose_device(900 * MIB, budgets, residents)
    assert plan.verdict is Verdict.MAKE_ROOM and plan.device == "cuda:1" and plan.evict == ["b"]
    assert choose_device(1200 * MIB, budgets, residents).verdict is Verdict.IMPOSSIBLE


def test_orchgate_models_prints_the_catalog_offline(
    smollm2: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from gateway.cli import main

    _tree(tmp_path / "models", smollm2)
    config = tmp_path / "orchgate.toml"
    config.write_text(
        f'[catalog]\ndirs = ["{tmp_path / "models"}"]\n[[catalog.recipes]]\nengine = "llamacpp"\n'
        'match = "smol*.gguf"\nctx = 2048\nlaunch = ["llama-server", "-m", "{model_path}", '
        '"--port", "{port}"]\n'
    )
    assert main(["models", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("smol-copy "))
    assert "available" in line and "Q4_1" in line and "2048" in line and "MiB" in line
    assert "SmolLM2-135M-Instruct.Q4_1" in out  # glob is case-insensitive: it matches too
    assert "suggested recipe launch: vllm serve" in out  # the config.json folders
    assert "skipped" in out and "partial download" in out
    assert main(["models", "--config", str(config), "--json"]) == 0
    report = trees.msgspec.json.decode(capsys.readouterr().out)
    assert {m["id"]: m["status"] for m in report["models"]}["broken"] == "failed"


def test_fit_on_a_device_the_host_lacks_is_a_verdict_not_silence(
    smollm2: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from gateway.cli import main

    config = tmp_path / "orchgate.toml"
    config.write_text("[hardware]\ngpus = []\n")  # a host without GPUs, whatever this one has
    code = main(["fit", str(smollm2), "--device", "cuda", "--config", str(config)])
    out = capsys.readouterr().out
    assert code == 1 and "does NOT fit: no GPU found" in out
    assert main(["fit", str(smollm2), "--device", "cuda", "--config", str(config), "--json"]) == 1
    report = trees.msgspec.json.decode(capsys.readouterr().out)
    assert report["fits"] is False and report["problem"] == "no GPU found"
