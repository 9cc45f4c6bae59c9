"""Speed estimates and the ranking: the pure model (MoE reads its used experts only,
offload blends, compute caps small models, 0 with a reason when it does not fit), the
deterministic order, quantisation names; and the estimate beside what llama-server
really does with SmolLM2 on this CPU."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import msgspec
import pytest

from backends.hardware import detect
from backends.model_file import ModelShape, read_model
from policies.ranking import Placement, Ranked, merit, normalise_quant, rank
from policies.scores import parse_snapshot, score_for
from policies.speed import Device, SpeedEstimate, active_weight_bytes, estimate_speed
from tests.conftest import LlamaServer, test_assets

GB = 10**9


def shape(**changes: object) -> ModelShape:
    base = ModelShape(
        source="gguf", path="m.gguf", architecture="llama", name="m", params=8 * GB,
        weights_bytes=4 * GB, quant="Q4_K_M", layers=32, embedding=4096, feed_forward=14336,
        heads=32, kv_heads=8, key_length=128, value_length=128, vocab=128256,
        context_train=8192, file_bytes=4 * GB,
    )  # fmt: skip
    return msgspec.structs.replace(base, **changes)


H100 = Device("cuda", "GPU 0 H100", 3350.0, tflops=400.0)
SPARK = Device("cuda", "GB10", 273.0, tflops=50.0)


def test_decode_is_bandwidth_over_bytes_per_token() -> None:
    dense = estimate_speed(shape(), H100, "vllm", context=2)
    # 4 GB read per token at 3350 GB/s x 0.75: ~630 tokens/s
    assert dense.bound == "bandwidth" and 550 < dense.decode_tokens_s < 700
    assert dense.prefill_tokens_s is not None and dense.prefill_tokens_s > 10_000
    longer = estimate_speed(shape(), H100, "vllm", context=32768)
    assert longer.decode_tokens_s < dense.decode_tokens_s  # the KV cache is read too


def test_a_mixture_of_experts_reads_only_the_experts_it_uses() -> None:
    # Qwen3.6-35B-A3B NVFP4 on a DGX Spark (GB10, 273 GB/s): ~97 tokens/s published
    moe = shape(params=35 * GB, weights_bytes=20 * GB, experts=128, experts_used=8,
                expert_bytes=19 * GB)  # fmt: skip
    assert active_weight_bytes(moe) == int(1 * GB + 19 * GB * 8 / 128)
    estimate = estimate_speed(moe, SPARK, "vllm", context=4096)
    assert 75 < estimate.decode_tokens_s < 120, estimate
    dense = msgspec.structs.replace(moe, experts=0)  # read whole: many times slower
    assert estimate_speed(dense, SPARK, "vllm").decode_tokens_s < estimate.decode_tokens_s / 8


def test_partial_offload_blends_and_a_misfit_is_zero_with_a_reason() -> None:
    cpu = Device("cpu", "CPU", 80.0, cores=16)
    full = estimate_speed(shape(), H100, "llamacpp").decode_tokens_s
    half = estimate_speed(shape(), H100, "llamacpp", gpu_fraction=0.5, cpu=cpu)
    assert half.decode_tokens_s < full / 5 and half.confidence == "rough"
    nope = estimate_speed(shape(), H100, "llamacpp", fits=False)
    assert nope == SpeedEstimate(0.0, None, 0, "none", 0.0, "none", "does not fit in memory")
    unknown = estimate_speed(shape(), Device("cuda", "mystery", None), "vllm")
    assert unknown.decode_tokens_s == 0 and "bandwidth" in (unknown.reason or "")


def test_small_models_on_few_cores_are_bound_by_arithmetic() -> None:
    tiny = shape(params=135 * 10**6, weights_bytes=97 * 10**6, layers=30, kv_heads=3,
                 key_length=64, value_length=64)  # fmt: skip
    two_cores = estimate_speed(tiny, Device("cpu", "CPU", 100.0, cores=2), "llamacpp")
    assert two_cores.bound == "compute"
    many = estimate_speed(tiny, Device("cpu", "CPU", 100.0, cores=64), "llamacpp")
    assert many.bound == "bandwidth" and many.decode_tokens_s > two_cores.decode_tokens_s


def test_quantisation_names_are_normalised_and_unknown_ones_flagged() -> None:
    assert normalise_quant("MOSTLY_Q4_K_M") == ("Q4_K_M", True)
    assert normalise_quant("q8_0") == ("Q8_0", True)
    assert normalise_quant("bfloat16") == ("BF16", True)
    assert normalise_quant("nvfp4") == ("NVFP4", True)
    assert normalise_quant("4bit") == ("4bit", True)  # MLX
    assert normalise_quant("file_type 99") == ("file_type 99", False)


def test_ranking_is_fits_first_then_speed_then_size_then_id() -> None:
    def model(model_id: str, tokens_s: float, size: int, fits: bool = True) -> Ranked:
        speed = SpeedEstimate(tokens_s if fits else 0.0, None, 1, "bandwidth", 0.6, "estimate")
        place = Placement("cpu", fits, 1, 2, None if fits else "no room", speed)
        return Ranked(model_id, size, ["chat"], "Q4_0", True, [place])

    models = [model("b", 50, 10), model("a", 50, 10), model("big", 99, 1, fits=False),
              model("fast", 80, 99), model("Émile", 50, 5)]  # fmt: skip
    assert [m.id for m in rank(models)] == ["fast", "Émile", "a", "b", "big"]
    assert [m.id for m in rank(models, job="embed")] == []


def test_benchmark_scores_blend_with_their_stated_weight() -> None:
    snapshot = parse_snapshot(
        b'{"source": "evals 2026-11", "scale": 100, "models": {'
        b'"qwen*": {"overall": 40}, "qwen2.5-7b*": {"chat": 90}, "Slow": {"chat": 80}}}'
    )
    assert score_for(snapshot, "qwen2.5-7b-instruct-q4", "chat") == 0.9  # longest glob
    assert score_for(snapshot, "qwen2.5-7b-instruct-q4", "embed") is None  # no overall there
    assert score_for(snapshot, "qwen3-1b", "chat") == 0.4  # job missing: overall
    assert score_for(snapshot, "slow", "chat") == 0.8  # ids are case-insensitive
    assert score_for(snapshot, "other", "chat") is None  # never guessed

    def model(model_id: str, tokens_s: float, score: float | None) -> Ranked:
        speed = SpeedEstimate(tokens_s, None, 1, "bandwidth", 0.6, "estimate")
        place = Placement("cpu", True, 1, 2, None, speed)
        return Ranked(model_id, 1, ["chat"], "Q4_0", True, [place], score=score)

    models = [model("fast", 100, 0.2), model("slow", 20, 0.9), model("unscored", 60, None)]
    assert [m.id for m in rank(models)] == ["fast", "unscored", "slow"]  # speed alone
    # weight 0.5: fast 0.5*0.2+0.5*1 = 0.60, slow 0.45+0.1 = 0.55, unscored 0+0.3 = 0.30
    assert [m.id for m in rank(models, score_weight=0.5)] == ["fast", "slow", "unscored"]
    assert [m.id for m in rank(models, score_weight=0.9)] == ["slow", "fast", "unscored"]
    assert [m.id for m in rank(models, score_weight=0.0)] == ["fast", "unscored", "slow"]
    assert merit(models[1], models, 0.5) == 0.55

    for bad in (b'{"models": {}}', b'{"source": "x", "models": {"a": {"chat": 120}}}', b"["):
        with pytest.raises(ValueError):
            parse_snapshot(bad)


@pytest.mark.llamacpp
def test_the_estimate_is_close_to_what_llama_server_does_here(llama_server: LlamaServer) -> None:
    """Calibration on this machine: SmolLM2 Q4_1 on llama-server (-t 2), one stream."""
    prompt = "The history of the lighthouse begins " * 12
    measured = []
    for _ in range(3):
        answer = httpx.post(
            llama_server.url + "/completion",
            json={"prompt": prompt, "n_predict": 64, "cache_prompt": False, "ignore_eos": True},
            timeout=120,
        ).json()
        measured.append(answer["timings"]["predicted_per_second"])
    hardware = detect()
    cpu = Device("cpu", "CPU", hardware.cpu.bandwidth_gbps, cores=hardware.cpu.cores)
    smollm2 = read_model(test_assets.smollm2_model())
    estimate = estimate_speed(smollm2, cpu, "llamacpp", context=1024)
    best = max(measured)
    print(f"SmolLM2 Q4_1 decode: measured {best:.1f} tokens/s, estimated "
          f"{estimate.decode_tokens_s:.1f} ({estimate.bound}-bound)")  # fmt: skip
    assert best / 3 < estimate.decode_tokens_s < best * 3  # within 3x on any CPU of the kind
    answer = httpx.post(
        llama_server.url + "/completion",
        json={"prompt": prompt * 3, "n_predict": 1, "cache_prompt": False},
        timeout=120,
    ).json()
    prefill = answer["timings"]["prompt_per_second"]
    print(f"prefill: measured {prefill:.0f} tokens/s, estimated {estimate.prefill_tokens_s:.0f}")
    assert estimate.prefill_tokens_s is not None
    assert prefill / 3 < estimate.prefill_tokens_s < prefill * 3


@pytest.mark.slow  # the real OpenVINO GenAI runtime on CPU
def test_the_estimate_is_close_to_what_openvino_genai_does_here() -> None:
    """Calibration of the ``openvino`` engine on this CPU: SmolLM2 through OpenVINO GenAI's
    GGUF reader, one stream, its own perf metrics (after a warm-up: the first call
    compiles)."""
    import openvino_genai

    path = test_assets.smollm2_model()
    pipe = openvino_genai.LLMPipeline(str(path), "CPU")
    config = openvino_genai.GenerationConfig()
    config.max_new_tokens, config.ignore_eos = 64, True
    prompt = "The history of the lighthouse begins " * 40
    decode, prefill = [], []
    for _ in range(4):
        metrics = pipe.generate([prompt], config).perf_metrics
        decode.append(1000 / metrics.get_tpot().mean)
        prefill.append(metrics.get_num_input_tokens() / metrics.get_ttft().mean * 1000)
    hardware = detect()
    cpu = Device("cpu", "CPU", hardware.cpu.bandwidth_gbps, cores=hardware.cpu.cores)
    estimate = estimate_speed(read_model(path), cpu, "openvino", context=1024)
    print(f"OpenVINO GenAI SmolLM2 decode: measured {max(decode):.1f} tokens/s, estimated "
          f"{estimate.decode_tokens_s:.1f}; prefill measured {max(prefill[1:]):.0f}, "
          f"estimated {estimate.prefill_tokens_s:.0f}")  # fmt: skip
    assert max(decode) / 3 < estimate.decode_tokens_s < max(decode) * 3
    assert estimate.prefill_tokens_s is not None
    # oneDNN's prompt kernels differ most between CPUs (AMX, AVX-512, AVX2): 5x either way
    assert max(prefill[1:]) / 5 < estimate.prefill_tokens_s < max(prefill[1:]) * 5


def test_orchgate_models_rank_orders_what_fits_here(tmp_path: Path) -> None:
    from gateway.cli import main
    from tests import catalog_trees as trees

    smollm2 = test_assets.smollm2_model()
    trees.link_or_copy(smollm2, tmp_path / "models" / "small.gguf")
    trees.config_folder(tmp_path / "models" / "needs-gpu")  # vLLM only: nowhere on a CPU host
    config = tmp_path / "orchgate.toml"
    config.write_text(
        f'[hardware]\ngpus = []\nram_gb = 8\n[catalog]\ndirs = ["{tmp_path / "models"}"]\n'
    )
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["models", "rank", "--config", str(config), "--json"]) == 0
    rows = msgspec.json.decode(out.getvalue())["models"]
    assert [r["id"] for r in rows] == ["small", "needs-gpu"]
    assert rows[0]["fits"] and rows[0]["decode_tokens_s"] > 0 and rows[0]["quant"] == "Q4_1"
    memory = rows[0]["placements"][0]["memory"]
    assert memory["weights_bytes"] > 0 and memory["kv_cache_bytes"] > 0
    assert memory["total_bytes"] == rows[0]["need_bytes"]
    assert not rows[1]["fits"] and rows[1]["why_not"] == ["no device this engine runs on"]

    # the operator's scores: shown, blended, and a broken file reported, never fatal
    scores = tmp_path / "scores.json"
    scores.write_text('{"source": "my evals", "models": {"small": {"chat": 55.5}}}')
    config.write_text(config.read_text() + f'scores_file = "{scores}"\nscore_weight = 0.3\n')
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["models", "rank", "--config", str(config), "--job", "chat"]) == 0
    table = out.getvalue()
    assert f"scores: my evals ({scores}), weight 0.3 against speed" in table, table
    assert re.search(r"1 small\s+yes .* Q4_1\s+55\.5 ", table), table
    scores.write_text("{not json")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["models", "rank", "--config", str(config), "--json"]) == 0
    report = msgspec.json.decode(out.getvalue())
    assert report["scores"]["error"].startswith("not a score snapshot"), report["scores"]
    assert [r["id"] for r in report["models"]] == ["small", "needs-gpu"]
