"""BeamSearch against HF transformers' beam search, driven by the same tiny random Llama."""

import pytest
import torch

from slimlm.engine.beam_search import BeamSearch

transformers = pytest.importorskip("transformers")

torch.set_num_threads(1)
EOS_IDS = (7, 12)


@pytest.fixture(scope="module")
def hf_model():
    config = transformers.LlamaConfig(
        vocab_size=48,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        initializer_range=0.3,  # peaky distributions, so eos gets picked now and then
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight[list(EOS_IDS)] *= 2.5  # make the eos tokens likely enough to end beams
    return model


def _drive(model, prompt, search, num_beams):
    """Run our BeamSearch with the HF model's logits, batching the beams the way HF does."""
    while not search.done:
        if search.num_generated == 0:
            batch = torch.tensor([prompt] * num_beams)  # HF forwards the prompt once per beam
        else:
            batch = torch.tensor([prompt + beam for beam in search.beams])
        with torch.no_grad():
            logits = model(input_ids=batch, attention_mask=torch.ones_like(batch)).logits[:, -1].float()
        log_probs = torch.log_softmax(logits, dim=-1)
        search.step(log_probs[: len(search.beams)])
    return search.results()


@pytest.mark.parametrize(
    "num_beams,max_tokens,length_penalty,early_stopping",
    [(3, 8, 1.0, False), (4, 10, 0.5, True), (2, 12, 2.0, "never"), (4, 9, -1.0, False), (2, 6, 1.0, True)],
)
@pytest.mark.parametrize("prompt_seed", [0, 1, 2])
@pytest.mark.parametrize("eos", [[7], [7, 12]])
def test_matches_hf_generate(
    hf_model, num_beams, max_tokens, length_penalty, early_stopping, prompt_seed, eos
):
    gen = torch.Generator().manual_seed(prompt_seed)
    prompt = torch.randint(0, 48, (5,), generator=gen).tolist()
    with torch.no_grad():
        ref = hf_model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False,
            num_beams=num_beams,
            num_return_sequences=num_beams,
            max_new_tokens=max_tokens,
            length_penalty=length_penalty,
            early_stopping=early_stopping,
            eos_token_id=eos,
            pad_token_id=eos[0],
            use_cache=False,
            output_scores=True,
            return_dict_in_generate=True,
        )
    search = BeamSearch(num_beams, max_tokens, eos, length_penalty, early_stopping)
    ours = _drive(hf_model, prompt, search, num_beams)
    assert len(ours) == num_beams
    for hyp, ref_seq, ref_score in zip(ours, ref.sequences, ref.sequences_scores, strict=True):
        generated = ref_seq[len(prompt) :].tolist()
        assert generated[: len(hyp.token_ids)] == hyp.token_ids
        assert all(t == eos[0] for t in generated[len(hyp.token_ids) :])  # HF pads with pad_token_id
        assert hyp.score == pytest.approx(ref_score.item(), rel=1e-6, abs=1e-6)


def test_step_checks_its_input_and_stops_when_done():
    search = BeamSearch(num_beams=2, max_tokens=1, eos_token_ids=[0])
    with pytest.raises(ValueError, match="1 beams"):
        search.step(torch.zeros(2, 5))
    pairs = search.step(torch.log_softmax(torch.tensor([[0.0, 3.0, 2.0, 1.0, -1.0]]), dim=-1))
    assert search.done  # max_tokens reached
    assert [h.token_ids for h in search.results()] == [[1], [2]]
    assert pairs == []  # every continuation finished: nothing left running
    with pytest.raises(RuntimeError, match="finished"):
        search.step(torch.zeros(2, 5))
