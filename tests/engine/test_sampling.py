"""Sampling processors against HF transformers' logits processors, seeded draws, logprobs, params."""

import math
from collections import Counter

import pytest
import torch

from slimlm.engine import sampling
from slimlm.engine.params import SamplingParams
from slimlm.engine.sequence import Sequence
from slimlm.errors import SlimlmError

lp = pytest.importorskip("transformers.generation.logits_process")

torch.set_num_threads(1)
V = 50


def random_logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, V, generator=torch.Generator().manual_seed(seed)) * 3


def histories(seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (n,), generator=g).tolist() for n in (12, 1, 30, 7)]


def per_row(processor_factory, logits, values, token_ids_lists=None):
    """HF processors take one setting per batch: run them a row at a time."""
    rows = []
    for i, value in enumerate(values):
        ids = torch.tensor([token_ids_lists[i]]) if token_ids_lists else torch.zeros(1, 1, dtype=torch.long)
        rows.append(processor_factory(value)(ids, logits[i : i + 1].clone()))
    return torch.cat(rows)


def test_repetition_penalty_matches_hf():
    logits, hist = random_logits(4), histories()
    penalties = [1.3, 0.7, 2.0, 1.0]
    ours = sampling.apply_repetition_penalty(logits, hist, penalties)
    ref = per_row(lp.RepetitionPenaltyLogitsProcessor, logits, penalties, hist)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    assert not torch.equal(ours, logits)


@pytest.mark.parametrize("sizes", [[2, 2, 3, 1], [3, 1, 2, 4]])
def test_no_repeat_ngram_matches_hf(sizes):
    logits = random_logits(4)
    hist = [[1, 2, 3, 1, 2, 3, 1, 2], [5], [4, 4, 4, 4, 9, 4, 4], [7, 8, 9, 7, 8, 9, 7, 8, 9, 7, 8]]
    ours = sampling.apply_no_repeat_ngram(logits, hist, sizes)
    ref = per_row(lp.NoRepeatNGramLogitsProcessor, logits, sizes, hist)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    assert torch.isinf(ours).any()


def test_no_repeat_ngram_on_random_histories_matches_hf():
    logits, hist = random_logits(4, seed=3), [h * 3 for h in histories(seed=4)]
    ours = sampling.apply_no_repeat_ngram(logits, hist, [2, 2, 2, 2])
    torch.testing.assert_close(ours, per_row(lp.NoRepeatNGramLogitsProcessor, logits, [2] * 4, hist))


def test_presence_and_frequency_penalties_follow_openai():
    logits, hist = random_logits(4), histories()
    presence, frequency = [0.5, 0.0, -1.0, 2.0], [0.3, 1.0, 0.0, -0.5]
    ours = sampling.apply_presence_frequency_penalties(logits, hist, presence, frequency)
    ref = logits.clone()
    for row, tokens in enumerate(hist):
        for token, count in Counter(tokens).items():
            ref[row, token] -= presence[row] + frequency[row] * count
    torch.testing.assert_close(ours, ref)


def test_min_tokens_bans_stop_tokens_until_reached():
    logits = random_logits(3)
    ours = sampling.apply_min_tokens(logits, [0, 3, 5], [2, 3, 9], [[1, 4], [1], [7]])
    assert torch.isinf(ours[0, [1, 4]]).all() and torch.isinf(ours[2, 7])
    torch.testing.assert_close(ours[1], logits[1])
    assert torch.isfinite(ours).sum() == 3 * V - 3


def test_temperature_matches_hf_and_zero_means_unchanged():
    logits = random_logits(3)
    ours = sampling.apply_temperature(logits, [0.5, 1.7, 0.0])
    ref = per_row(lp.TemperatureLogitsWarper, logits[:2], [0.5, 1.7])
    torch.testing.assert_close(ours[:2], ref)
    torch.testing.assert_close(ours[2], logits[2])


def test_top_k_matches_hf():
    logits = random_logits(4)
    ks = [1, 5, 0, -1]
    ours = sampling.apply_top_k(logits, ks)
    ref = per_row(lp.TopKLogitsWarper, logits[:2], ks[:2])
    torch.testing.assert_close(ours[:2], ref, rtol=0, atol=0)
    torch.testing.assert_close(ours[2:], logits[2:])  # 0 and -1 disable it
    assert torch.isfinite(ours[1]).sum() == 5


def test_top_p_matches_hf():
    logits = random_logits(4, seed=5)
    ps = [0.1, 0.5, 0.9, 1.0]
    ours = sampling.apply_top_p(logits, ps)
    torch.testing.assert_close(ours, per_row(lp.TopPLogitsWarper, logits, ps), rtol=0, atol=0)
    assert torch.isfinite(ours[0]).sum() < torch.isfinite(ours[2]).sum() < V


def test_min_p_matches_hf():
    logits = random_logits(4, seed=6)
    ps = [0.05, 0.2, 0.9, 0.0]
    ours = sampling.apply_min_p(logits, ps[:3] + [0.0])
    ref = per_row(lp.MinPLogitsWarper, logits[:3], ps[:3])
    torch.testing.assert_close(ours[:3], ref, rtol=0, atol=0)
    torch.testing.assert_close(ours[3], logits[3])


def test_processors_do_not_modify_their_input():
    logits, hist = random_logits(4), histories()
    before = logits.clone()
    sampling.apply_repetition_penalty(logits, hist, [2.0] * 4)
    sampling.apply_presence_frequency_penalties(logits, hist, [1.0] * 4, [1.0] * 4)
    sampling.apply_no_repeat_ngram(logits, hist, [1] * 4)
    sampling.apply_min_tokens(logits, [0] * 4, [1] * 4, [[0]] * 4)
    sampling.apply_top_p(logits, [0.5] * 4)
    sampling.sample(logits, [SamplingParams(top_k=3)] * 4)
    assert torch.equal(logits, before)


def test_greedy_rows_take_the_argmax():
    logits = random_logits(3)
    tokens = sampling.sample(logits, [SamplingParams(temperature=0)] * 2 + [SamplingParams(top_k=1)])
    assert tokens.tolist() == logits.argmax(-1).tolist()


def test_seeded_draws_do_not_depend_on_the_batch():
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=123)

    def draws(batch_logits, row, extra_generators):
        gen = torch.Generator().manual_seed(123)
        out = []
        for step in range(5):
            logits = batch_logits(step)
            gens = list(extra_generators)
            gens.insert(row, gen)
            ps = [SamplingParams(temperature=1.3, top_k=7)] * (len(gens) - 1)
            ps.insert(row, params)
            out.append(sampling.sample(logits, ps, gens)[row].item())
        return out

    target = [random_logits(1, seed=100 + s)[0] for s in range(5)]
    alone = draws(lambda s: target[s][None], 0, [])
    crowd = draws(
        lambda s: torch.stack([random_logits(1, seed=s)[0], target[s], random_logits(1, seed=9 + s)[0]]),
        1,
        [None, torch.Generator().manual_seed(7)],
    )
    assert alone == crowd
    other_seed = []
    gen = torch.Generator().manual_seed(124)
    for s in range(5):
        other_seed.append(sampling.sample(target[s][None], [params], [gen]).item())
    assert other_seed != alone  # the generator really drives the draw


def test_sampling_follows_the_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -30.0]])
    expected = torch.softmax(logits / 0.8, dim=-1)[0]
    gen = torch.Generator().manual_seed(0)
    n = 4000
    counts = Counter(
        sampling.sample(logits, [SamplingParams(temperature=0.8)], [gen]).item() for _ in range(n)
    )
    for token in range(5):
        freq = counts[token] / n
        sigma = math.sqrt(expected[token] * (1 - expected[token]) / n)
        assert abs(freq - expected[token].item()) < 5 * sigma + 1e-9


def test_compute_logprobs_uses_raw_logits():
    logits = random_logits(3)
    chosen = torch.tensor([4, 0, 17])
    out = sampling.compute_logprobs(logits, chosen, [0, 3, 1])
    ref = torch.log_softmax(logits, dim=-1)
    for row, entry in enumerate(out):
        assert entry.token_id == chosen[row].item()
        assert entry.logprob == pytest.approx(ref[row, chosen[row]].item())
    assert out[0].top == []
    order = ref[1].argsort(descending=True)[:3].tolist()
    assert [t for t, _ in out[1].top] == order
    assert [v for _, v in out[1].top] == pytest.approx(ref[1, order].tolist())


def test_sample_next_tokens_applies_penalties_before_greedy_and_reports_raw_logprobs():
    logits = torch.tensor([[5.0, 4.0, 0.0], [5.0, 4.0, 0.0]])
    plain = Sequence([0, 0], SamplingParams(temperature=0, logprobs=1))
    penalized = Sequence([0, 0], SamplingParams(temperature=0, repetition_penalty=2.0))
    tokens, logprobs = sampling.sample_next_tokens(logits, [plain, penalized])
    assert tokens == [0, 1]  # 5 / 2 < 4
    assert logprobs[1] is None
    assert logprobs[0].logprob == pytest.approx(torch.log_softmax(logits[0], -1)[0].item())
    assert logprobs[0].top[0][0] == 0


def test_sample_next_tokens_honours_min_tokens_with_eos():
    logits = torch.tensor([[9.0, 1.0, 0.0]])
    seq = Sequence([1], SamplingParams(temperature=0, min_tokens=1))
    assert sampling.sample_next_tokens(logits, [seq], eos_token_ids=[0])[0] == [1]
    seq.append_token(1)
    assert sampling.sample_next_tokens(logits, [seq], eos_token_ids=[0])[0] == [0]


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"min_tokens": 300}, "min_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 1.1}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"no_repeat_ngram_size": -1}, "no_repeat_ngram_size"),
        ({"seed": 1.5}, "seed"),
        ({"stop": [""]}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"logprobs": 21}, "logprobs"),
        ({"num_beams": 0}, "num_beams"),
        ({"early_stopping": "sometimes"}, "early_stopping"),
        ({"ignore_eos": 1}, "ignore_eos"),
    ],
)
def test_invalid_params_name_the_parameter(kwargs, name):
    with pytest.raises(SlimlmError, match=rf"^sampling parameter {name}=.* must be"):
        SamplingParams(**kwargs)


def test_params_normalize_and_greedy():
    p = SamplingParams(stop="###", temperature=0, top_k=-1, logprobs=0)
    assert p.stop == ["###"] and p.greedy and not p.use_beam_search
    assert not SamplingParams().greedy
    assert SamplingParams(num_beams=3, early_stopping="never").use_beam_search
