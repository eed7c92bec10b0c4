"""slimlm.plan inputs: model presets, GGUF / HF configs, devices and memory units, and their bad-input errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from slimlm.errors import SlimlmError
from slimlm.plan.devices import describe_device, read_meminfo
from slimlm.plan.models import model_presets, resolve_model
from slimlm.plan.units import GB, GiB, MiB, parse_bytes

REQUIRED_PRESETS = ("llama-2-7b", "llama-3-8b", "mistral-7b", "qwen2.5-7b", "internlm2.5-7b")


def test_presets_reproduce_published_parameter_counts():
    presets = model_presets()
    for key in REQUIRED_PRESETS:
        assert key in presets
    for key, entry in presets.items():
        planned = resolve_model(key)
        assert planned.config.num_parameters() == entry["published_parameters"], key
    assert not resolve_model("internlm2.5-7b").runs_in_slimlm
    assert "Llama-shaped" in resolve_model("internlm2.5-7b").note


def test_unknown_preset_suggests_close_names():
    with pytest.raises(SlimlmError, match="did you mean llama-3-8b"):
        resolve_model("llama3-8b")
    with pytest.raises(SlimlmError, match="unknown model"):
        resolve_model("no-such-thing-at-all")


def test_hf_config_json_and_directory(tmp_path):
    cfg = dict(model_presets()["qwen2.5-7b"]["config"], architectures=["Qwen2ForCausalLM"])
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    by_dir = resolve_model(str(tmp_path))
    by_file = resolve_model(str(tmp_path / "config.json"))
    assert by_dir.config.num_parameters() == by_file.config.num_parameters() == 7615616512
    # an architecture slimlm does not run is planned from its sizes
    (tmp_path / "config.json").write_text(
        json.dumps({**cfg, "architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2"})
    )
    other = resolve_model(str(tmp_path))
    assert not other.runs_in_slimlm and other.architecture == "InternLM2ForCausalLM"


def test_config_missing_keys_and_bad_paths(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 64})
    )
    with pytest.raises(SlimlmError, match="missing required keys: vocab_size"):
        resolve_model(str(tmp_path))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(SlimlmError, match="not valid JSON"):
        resolve_model(str(tmp_path / "bad.json"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SlimlmError, match="no config.json"):
        resolve_model(str(empty))


def test_embedded_gguf_header_matches_gguf_reader(smollm_path):
    """The fast header walk reads the same metadata and tensor shapes as the gguf package."""
    import gguf

    from slimlm.loading.gguf_file import field_value
    from slimlm.plan.gguf_config import read_gguf_header

    header = read_gguf_header(smollm_path)
    reader = gguf.GGUFReader(str(smollm_path))
    assert set(header.metadata) == set(reader.fields) - {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        value = field_value(field)
        expected = len(value) if isinstance(value, list) and len(value) > 4096 else value
        if isinstance(expected, list) and expected and isinstance(expected[0], str):
            expected = len(expected)
        got = header.metadata[key]
        assert got == pytest.approx(expected) if isinstance(got, float) else got == expected, key
    assert {t.name: tuple(int(d) for d in t.shape) for t in reader.tensors} == {
        k: v[0] for k, v in header.tensors.items()
    }

    planned = resolve_model(None)
    assert planned.source == "embedded" and planned.file_bytes == smollm_path.stat().st_size
    c = planned.config
    assert (
        c.num_hidden_layers,
        c.hidden_size,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.vocab_size,
    ) == (30, 576, 9, 3, 49152)
    assert c.tie_word_embeddings and c.num_parameters() == 134_515_008


def _write_gguf(path, arch="internlm2", drop=None, tensors=True):
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    values = {"block_count": 2, "embedding_length": 64, "feed_forward_length": 96, "head_count": 4, "head_count_kv": 2,
              "context_length": 128}  # fmt: skip
    for key, value in values.items():
        if key != drop:
            getattr(w, f"add_{key}")(value)
    w.add_token_list([f"t{i}" for i in range(100)])
    if tensors:
        w.add_tensor("token_embd.weight", np.zeros((100, 64), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_of_another_architecture_and_bad_files(tmp_path):
    _write_gguf(tmp_path / "m.gguf")
    planned = resolve_model(str(tmp_path / "m.gguf"))
    c = planned.config
    assert planned.architecture == "internlm2" and not planned.runs_in_slimlm
    assert (c.vocab_size, c.num_hidden_layers, c.num_key_value_heads, c.head_dim) == (100, 2, 2, 16)
    assert c.tie_word_embeddings  # no output.weight tensor

    _write_gguf(tmp_path / "partial.gguf", drop="feed_forward_length")
    with pytest.raises(SlimlmError, match="missing internlm2.feed_forward_length"):
        resolve_model(str(tmp_path / "partial.gguf"))

    data = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:200])
    with pytest.raises(SlimlmError, match="not a readable GGUF|truncated or corrupt"):
        resolve_model(str(tmp_path / "cut.gguf"))
    (tmp_path / "fake.gguf").write_bytes(b"NOPE" + data[4:])
    with pytest.raises(SlimlmError, match="not a GGUF file"):
        resolve_model(str(tmp_path / "fake.gguf"))


def test_memory_units_are_explicit():
    assert parse_bytes("24GiB") == 24 * 2**30
    assert parse_bytes("24GB") == 24 * 10**9
    assert parse_bytes("512 MiB") == 512 * 2**20
    assert parse_bytes("1.5gib") == int(1.5 * 2**30)
    for bad in ("24", "-3GB", "lots", "24 GX", "0GB"):
        with pytest.raises(SlimlmError):
            parse_bytes(bad)
    with pytest.raises(SlimlmError, match="a unit is required"):
        parse_bytes("24")


def test_devices():
    d = describe_device("rtx4090")
    assert d.total_bytes == 24564 * MiB and d.kind == "gpu" and d.cuda_context_bytes > 0
    assert describe_device("a100-80g").total_bytes == 81920 * MiB
    sized = describe_device(None, "24GB", cuda_context_bytes=0)
    assert sized.total_bytes == sized.usable_bytes == 24 * GB and sized.cuda_context_bytes == 0
    assert describe_device("rtx3090", "20GiB").total_bytes == 20 * GiB
    with pytest.raises(SlimlmError, match="did you mean rtx4090"):
        describe_device("rtx490")
    with pytest.raises(SlimlmError, match="give a device"):
        describe_device(None, None)
    with pytest.raises(SlimlmError, match=">= 0"):
        describe_device("rtx4090", cuda_context_bytes=-1)


def test_cpu_device_reads_meminfo(tmp_path):
    info = tmp_path / "meminfo"
    info.write_text(
        "MemTotal:       1000 kB\nMemFree:         10 kB\nMemAvailable:    600 kB\nHugePages_Total:       0\n"
    )
    assert read_meminfo(str(info)) == {
        "MemTotal": 1024000,
        "MemFree": 10240,
        "MemAvailable": 614400,
        "HugePages_Total": 0,
    }
    cpu = describe_device("cpu")
    real = read_meminfo()
    assert cpu.kind == "cpu" and cpu.cuda_context_bytes == 0
    assert cpu.total_bytes == real["MemTotal"] and 0 < cpu.usable_bytes <= cpu.total_bytes
