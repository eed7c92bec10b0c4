"""`slimlm eval`: KL divergence and top-1 agreement against reference logits saved once, scored-token
counts, --stride, --kv-dtype, and the bad inputs (another model or token ids, a missing corpus,
a calibration text that overlaps the evaluation text)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from slimlm.cli import main
from slimlm.errors import SlimlmError
from slimlm.eval.fidelity import FidelityStats
from slimlm.eval.overlap import find_overlap, warn_overlap
from slimlm.eval.perplexity import perplexity, scored_count, window_logits
from slimlm.eval.reference import ReferenceReader, ReferenceWriter
from slimlm.quant.calibration import calibration_text, eval_text
from tests.tiny_models import make_hf_model, slimlm_from_hf

SMALL = ["--context", "32", "--max-tokens", "64", "-q"]


def test_kl_top1_and_ppl_match_torch():
    gen = torch.Generator().manual_seed(0)
    ref, var = torch.randn(50, 40, generator=gen) * 3, torch.randn(50, 40, generator=gen) * 3
    targets = torch.randint(0, 40, (50,), generator=gen)
    stats = FidelityStats()
    stats.add(ref[:20], var[:20], targets[:20])  # two windows, as perplexity yields them
    stats.add(ref[20:], var[20:], targets[20:])
    s = stats.summary()
    # torch's kl_div(input=log q, target=log p, log_target) is KL(p || q) per element
    kl = torch.nn.functional.kl_div(
        var.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="none"
    ).sum(-1)
    assert s["kl_mean"] == pytest.approx(float(kl.mean()), rel=1e-5)
    assert s["kl_p99"] == pytest.approx(float(torch.quantile(kl.double(), 0.99)), rel=1e-5)
    assert s["top1_agree"] == int((ref.argmax(-1) == var.argmax(-1)).sum()) / 50
    nll = torch.nn.functional.cross_entropy(var, targets)
    assert s["ppl"] == pytest.approx(math.exp(float(nll)), rel=1e-5)
    same = FidelityStats()
    same.add(ref, ref, targets)
    assert same.summary()["kl_mean"] < 1e-6 and same.summary()["top1_agree"] == 1.0


def test_float16_reference_gives_the_float32_kl(tmp_path):
    """Saved references hold float16 log-probs: the KL read back matches the exact one closely."""
    gen = torch.Generator().manual_seed(1)
    ref = torch.randn(64, 2000, generator=gen) * 4
    var = ref + 0.3 * torch.randn(64, 2000, generator=gen)
    targets = torch.randint(0, 2000, (64,), generator=gen)
    exact = FidelityStats()
    exact.add(ref, var, targets)
    writer = ReferenceWriter(tmp_path, 64, 2000, {"model": {}, "ids_hash": "x", "num_ids": 65})
    writer.add(ref.log_softmax(-1))
    writer.close()
    stored = FidelityStats()
    stored.add_logprobs(ReferenceReader(tmp_path).next(64), var, targets)
    assert stored.summary()["kl_mean"] == pytest.approx(exact.summary()["kl_mean"], rel=2e-3)


@torch.inference_mode()
def test_max_tokens_counts_scored_tokens_and_stride_overlaps_windows():
    model = slimlm_from_hf(make_hf_model("llama"))
    ids = torch.randint(0, 128, (200,), generator=torch.Generator().manual_seed(2)).tolist()
    r = perplexity(model, ids, context=16, max_tokens=64, progress=False)
    assert r.tokens == 64 == scored_count(65, 16, None)
    r = perplexity(model, ids, context=16, stride=8, max_tokens=64, progress=False)
    assert r.tokens == 64 == scored_count(65, 16, 8) and r.stride == 8
    # the sliding-window recipe by hand: every token after the first window sees 8 tokens of history
    nll, count = 0.0, 0
    t = torch.tensor(ids[:65])
    for i, start in enumerate(range(0, 65 - 16, 8)):
        logits = model.forward_dense(t[None, start : start + 16])[0]
        first = 0 if i == 0 else 8
        nll += float(
            torch.nn.functional.cross_entropy(
                logits[first:], t[start + 1 : start + 17][first:], reduction="sum"
            )
        )
        count += 16 - first
    assert r.ppl == pytest.approx(math.exp(nll / count), rel=1e-5)


@pytest.mark.parametrize("kv_dtype", ["int8", "int4", "k8v4"])
def test_a_window_through_a_pool_is_what_decoding_reads(kv_dtype):
    """--kv-dtype prefills each window through a pool: the same logits as feeding the tokens one at a
    time through that pool (what the engine's decode steps see)."""
    from slimlm.kv import make_kv_cache
    from slimlm.kv.metadata import AttnMetadata

    model = slimlm_from_hf(make_hf_model("llama"))
    ids = torch.randint(0, 128, (20,), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        whole = window_logits(model, ids, kv_dtype, block_size=4)
        cache = make_kv_cache(model.config, 5, 4, kv_dtype, torch.float32, "cpu")
        cache.prepare_blocks(range(5))
        rows = []
        for p in range(20):
            meta = AttnMetadata(
                [1], [p + 1], block_tables=torch.arange(5)[None, :], slot_mapping=torch.tensor([p])
            )
            rows.append(model.compute_logits(model(ids[p : p + 1], torch.tensor([p]), cache, meta))[0])
    torch.testing.assert_close(whole, torch.stack(rows), rtol=1e-4, atol=1e-4)
    dense = window_logits(model, ids)
    assert not torch.allclose(whole, dense, atol=1e-4)  # the pool's rounding shows


def test_eval_ppl_saves_and_reuses_reference_logits(tmp_path, capsys):
    ref = tmp_path / "ref"
    assert main(["eval", "ppl", *SMALL, "--save-ref-logits", str(ref)]) == 0
    first = capsys.readouterr().out
    assert "over 64 tokens" in first
    assert main(["eval", "ppl", *SMALL, "--ref-logits", str(ref)]) == 0
    same = capsys.readouterr().out
    assert "KL mean 0.0000" in same and "top-1 agreement 100.00%" in same
    assert main(["eval", "ppl", *SMALL, "--ref-logits", str(ref), "--kv-dtype", "int4"]) == 0
    out = capsys.readouterr().out
    kl = float(out.split("KL mean ")[1].split()[0])
    assert 0 < kl < 1 and "KV int4" in out
    # other token ids (another text, tokenizer or length): a one-line error that says so
    assert main(["eval", "ppl", "--context", "32", "--max-tokens", "96", "-q", "--ref-logits", str(ref)]) == 2
    assert "other token ids" in capsys.readouterr().err
    # another model: the saved shape does not match
    meta = json.loads((ref / "meta.json").read_text())
    meta["model"]["hidden_size"] = 4096
    (ref / "meta.json").write_text(json.dumps(meta))
    assert main(["eval", "ppl", *SMALL, "--ref-logits", str(ref)]) == 2
    err = capsys.readouterr().err
    assert "another model" in err and "hidden_size 4096 vs 576" in err
    assert main(["eval", "ppl", *SMALL, "--ref-logits", str(tmp_path / "nothing")]) == 2
    assert "holds no reference logits" in capsys.readouterr().err


def test_eval_compare_reports_kl_per_variant_and_honours_stride(tmp_path, capsys):
    out = tmp_path / "r.json"
    args = ["eval", "compare", "--models", "default", "default", "--kv-dtypes", "auto", "int4", "--no-speed"]
    # 64-token windows: int4 keeps each sequence's first 32 tokens in bf16 (attention sinks), so a
    # shorter window would read no quantized K/V at all
    assert main([*args, "--context", "64", "--stride", "32", "--max-tokens", "128", "--json", str(out)]) == 0
    captured = capsys.readouterr()
    rows = json.loads(out.read_text())
    assert rows[0]["kl_mean"] < 1e-3 and rows[0]["top1_agree"] == 1.0
    # int4 K/V move the distributions measurably (7e-4 nats here), the same model does not
    assert rows[1]["kl_mean"] > max(1e-4, 10 * rows[0]["kl_mean"]) and rows[1]["kv_dtype"] == "int4"
    assert (
        "[1/2] default: loading" in captured.err
        and "[2/2] default: perplexity and KL (KV int4)" in captured.err
    )
    from slimlm.loading import load

    loaded = load(None, progress=False)
    ids = loaded.tokenizer.encode(eval_text(), add_special_tokens=False)
    strided = perplexity(loaded.model, ids, context=64, stride=32, max_tokens=128, progress=False)
    assert rows[0]["ppl"] == pytest.approx(strided.ppl, rel=1e-6)


def test_missing_corpus_is_named_as_the_corpus(tmp_path, capsys):
    assert main(["eval", "ppl", "--corpus", str(tmp_path / "none.txt"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "--corpus file" in err and "calibration" not in err
    with pytest.raises(SlimlmError, match="unknown text"):
        from slimlm.eval.texts import named_text

        named_text("shakespeare")


def test_overlap_warning_names_the_shared_text(tmp_path, capsys):
    # the default slices share only stock phrases: no warning
    assert find_overlap(calibration_text(), eval_text()).fraction < 0.005
    assert warn_overlap(calibration_text()[:20000], eval_text(), "calib", "eval").shared >= 0
    assert "warning" not in capsys.readouterr().err
    # a calibration file that contains a passage of the evaluation text
    passage = eval_text()[5000:9000]
    calib = tmp_path / "calib.txt"
    calib.write_text("Some words of my own to begin with.\n\n" + passage)
    assert main(["eval", "ppl", *SMALL, "--calib-file", str(calib)]) == 0
    err = capsys.readouterr().err
    assert "overlaps the evaluation text" in err and str(calib) in err
    example = err.split('e.g. "')[1].split('"')[0]
    assert example.split()[0] in passage.lower()
