"""`slimlm plan` end to end: table, JSON schema, plot, presets listing, and one-line errors for bad input."""

from __future__ import annotations

import json

import pytest

from slimlm.cli import main
from slimlm.plan.units import GB


def run_json(capsys, *argv: str) -> dict:
    assert main(["plan", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_inference_json_schema(capsys):
    doc = run_json(
        capsys, "--model", "llama-3-8b", "--device", "rtx4090", "--context", "8192", "--batch", "8"
    )
    assert doc["schema"] == "slimlm.plan/1" and doc["mode"] == "inference"
    assert set(doc) >= {"model", "device", "settings", "components", "total_bytes", "headroom_bytes", "fits",
                        "host_bytes", "problems", "suggestions", "inference"}  # fmt: skip
    names = [c["name"] for c in doc["components"]]
    assert names == ["weights", "kv_cache", "cuda_context", "workspace"]
    assert all(isinstance(c["bytes"], int) and isinstance(c["exact"], bool) for c in doc["components"])
    assert doc["total_bytes"] == sum(c["bytes"] for c in doc["components"])
    assert doc["model"]["parameters"] == 8030261248 and doc["device"]["total_bytes"] == 24564 * 2**20
    inf = doc["inference"]
    assert inf["kv_bytes_per_token"] == 131072 and inf["kv_tokens"] == inf["kv_blocks"] * 16
    assert doc["components"][3]["bytes"] == max(inf["runtime"].values())
    assert doc["settings"]["weight_format"] == "bf16"  # auto on a GPU: bf16
    # 16 GB of bf16 weights leave ~7.3 GB of KV pool on a 24 GiB card: ~56k tokens, not 8 x 8192
    assert 50_000 < inf["kv_tokens"] < 8 * 8192 and inf["max_context"] < 8192
    assert doc["fits"] is False and doc["suggestions"]


def test_training_json_and_table(capsys):
    doc = run_json(capsys, "--mode", "train", "--model", "qwen2.5-7b", "--device-memory", "80GB",
                   "--method", "qlora", "--gradient-checkpointing", "--max-seq-len", "1024")  # fmt: skip
    assert doc["mode"] == "training" and doc["device"]["total_bytes"] == 80 * GB
    assert doc["training"]["peak_phase"] in doc["training"]["phases"]
    assert doc["training"]["trainable_parameters"] < doc["model"]["parameters"] / 100
    assert doc["fits"] is True
    assert (
        main(["plan", "--mode", "train", "--model", "llama-2-7b", "--device", "a100-40g", "--units", "GB"])
        == 0
    )
    out = capsys.readouterr().out
    assert "optimizer_states" in out and "does not fit" in out and "GB = 10^9 bytes" in out


def test_default_model_and_plot(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "plan.png"
    assert main(["plan", "--device", "cpu", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "SmolLM2-135M" in out and f"wrote {png}" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    train_png = tmp_path / "train.png"
    assert (
        main(
            [
                "plan",
                "--mode",
                "train",
                "--device",
                "rtx3090",
                "--max-seq-len",
                "256",
                "--plot",
                str(train_png),
                "--json",
            ]
        )
        == 0
    )
    json.loads(capsys.readouterr().out)
    assert train_png.stat().st_size > 10_000


def test_list_presets(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["plan", "--list"]) == 0
    out = capsys.readouterr().out
    for name in ("llama-2-7b", "internlm2.5-7b", "plan only", "h100-80g", "rtx3090"):
        assert name in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "llama3-8b", "--device", "rtx4090"], "did you mean llama-3-8b"),
        (["--device", "rtx409"], "did you mean rtx4090"),
        (["--device-memory", "24"], "a unit is required"),
        (
            ["--device", "rtx4090", "--cache-max-entry-count", "1.5"],
            "cache_max_entry_count must be in (0, 1]",
        ),
        (["--device", "rtx4090", "--cache-max-entry-count", "0"], "cache_max_entry_count must be in (0, 1]"),
        (["--device", "rtx4090", "--batch", "-2"], "--batch must be positive"),
        (["--device", "rtx4090", "--context", "0"], "--context must be positive"),
        (["--device", "rtx4090", "--weights", "w3"], "unknown weight format"),
        (["--mode", "train", "--device", "rtx4090", "--batch-size", "0"], "--batch-size must be positive"),
        (["--mode", "train", "--device", "rtx4090", "--zero-stage", "5"], "ZeRO stage must be 0, 1, 2 or 3"),
        (["--mode", "train", "--device", "rtx4090", "--optim", "lion"], "unknown optimizer"),
        (
            ["--mode", "train", "--device", "rtx4090", "--method", "lora", "--lora-targets", "attn"],
            "unknown LoRA target",
        ),
        (  # a real projection name, but of the fused (Phi-3) layout: SmolLM2 has none, so nothing to train
            ["--mode", "train", "--device", "rtx4090", "--method", "lora", "--lora-targets", "qkv"],
            "none of the LoRA targets qkv_proj is a projection of this model",
        ),
        (["--device", "rtx4090", "--plot", "out.jpg"], "ending in .png"),
        (["--model", "/no/such/config.json", "--device", "rtx4090"], "unknown model"),
    ],
)
def test_bad_input_is_one_clear_line(capsys, argv, message):
    assert main(["plan", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
