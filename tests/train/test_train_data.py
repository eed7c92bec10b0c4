"""Data formats, loss masks, batching and the errors that name the bad file and line."""

from __future__ import annotations

import json

import pytest
import torch

from slimlm.errors import SlimlmError
from slimlm.loading import load
from slimlm.train.batching import collate, epoch_batches, split_train_eval
from slimlm.train.data import IGNORE_INDEX, Example, load_examples, read_records
from slimlm.train.loss import CausalLMLoss
from tests.train.conftest import write_jsonl


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load(str(tiny_model_dir), progress=False)


def learned_text(tok, example: Example) -> str:
    return tok.decode([i for i, lab in zip(example.input_ids, example.labels, strict=True) if lab != IGNORE_INDEX],
                      skip_special_tokens=False)  # fmt: skip


def test_xtuner_multiturn_with_system_learns_only_the_replies(tiny, tmp_path):
    record = {"conversation": [{"system": "be brief", "input": "hi", "output": "hello"},
                               {"input": "and?", "output": "bye"}]}  # fmt: skip
    (example,), _ = load_examples(tiny.tokenizer, [write_jsonl(tmp_path / "a.jsonl", [record])], 128)
    full = tiny.tokenizer.decode(example.input_ids, skip_special_tokens=False)
    assert full == ("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
                    "hello<|im_end|>\n<|im_start|>user\nand?<|im_end|>\n<|im_start|>assistant\nbye<|im_end|>\n")  # fmt: skip
    assert learned_text(tiny.tokenizer, example) == "hello<|im_end|>\nbye<|im_end|>\n"


def test_openai_messages_and_weight_zero(tiny, tmp_path):
    record = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "skip me", "weight": 0},
                           {"role": "user", "content": "b"}, {"role": "assistant", "content": [{"type": "text", "text": "keep"}]}]}  # fmt: skip
    (example,), _ = load_examples(tiny.tokenizer, [write_jsonl(tmp_path / "a.jsonl", [record])], 128)
    assert learned_text(tiny.tokenizer, example) == "keep<|im_end|>\n"


def test_json_array_and_plain_text(tiny, tmp_path):
    records = [
        {"text": "abc"},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}]},
    ]
    (tmp_path / "a.json").write_text(json.dumps(records, indent=2))
    (tmp_path / "b.txt").write_text("x" * 70)
    examples, stats = load_examples(tiny.tokenizer, [tmp_path / "a.json", tmp_path / "b.txt"], 32)
    assert examples[0].labels == examples[0].input_ids  # plain text: every token is learned
    assert tiny.tokenizer.decode(examples[0].input_ids, skip_special_tokens=False) == "abc<|im_end|>"
    # 70 characters + end-of-text = 71 tokens in windows of 32: 32, 32, 7
    assert [len(e) for e in examples[2:]] == [32, 32, 7] and stats["windows"] == 2
    lines = (tmp_path / "a.json").read_text().splitlines()
    second_item = next(i for i, line in enumerate(lines, 1) if '"messages"' in line) - 1  # its "{" line
    assert examples[1].where.endswith(f"a.json:{second_item}")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"text": "ok"}\n\n{"text": "ok"\n', "b.jsonl:3: not valid JSON"),
        ('{"text": "ok"}\n{"prompt": "x"}\n', "b.jsonl:2: unknown record format"),
        ('{"conversation": [{"input": "x"}]}\n', "b.jsonl:1: conversation turn 0 needs a string 'output'"),
        (
            '{"messages": [{"role": "user", "content": "x"}]}\n',
            "b.jsonl:1: the conversation has no assistant",
        ),
        ('{"messages": [{"role": "robot", "content": "x"}]}\n', "b.jsonl:1: message 0 needs a 'role'"),
        ("[1, 2]\n", "b.jsonl:1: a record must be a JSON object"),
    ],
)
def test_malformed_lines_name_file_and_line(tiny, tmp_path, content, message):
    (tmp_path / "b.jsonl").write_text(content)
    with pytest.raises(SlimlmError, match=message.replace("?", r"\?").replace("[", r"\[")):
        load_examples(tiny.tokenizer, [tmp_path / "b.jsonl"], 64)


def test_malformed_json_array_names_the_line(tmp_path):
    (tmp_path / "c.json").write_text('[\n {"text": "a"},\n {"text": 3}\n]')
    with pytest.raises(SlimlmError, match=r"c.json:3: 'text' must be a non-empty string"):
        list(read_records(tmp_path / "c.json"))
    (tmp_path / "d.json").write_text('[\n {"text": "a"},\n {"text": }\n]')
    with pytest.raises(SlimlmError, match=r"d.json:3: not valid JSON"):
        list(read_records(tmp_path / "d.json"))


def test_truncation_that_leaves_no_reply_drops_the_example(tiny, tmp_path):
    long = {"conversation": [{"input": "q" * 50, "output": "a"}]}
    short = {"conversation": [{"input": "q", "output": "a"}]}
    examples, stats = load_examples(tiny.tokenizer, [write_jsonl(tmp_path / "a.jsonl", [long, short])], 40)
    assert len(examples) == 1 and stats["dropped"] == 1
    with pytest.raises(SlimlmError, match="no usable training example"):
        load_examples(tiny.tokenizer, [write_jsonl(tmp_path / "b.jsonl", [long])], 40)


def _examples(lengths):
    return [Example(list(range(1, n + 1)), list(range(1, n + 1)), f"x:{i}") for i, n in enumerate(lengths)]


def test_bucketing_is_deterministic_and_covers_every_example():
    examples = _examples([3, 9, 4, 7, 2, 8, 5, 6, 10, 11])
    a = epoch_batches(examples, 3, "bucket", 32, seed=1, epoch=0)
    assert a == epoch_batches(examples, 3, "bucket", 32, seed=1, epoch=0)
    assert a != epoch_batches(examples, 3, "bucket", 32, seed=1, epoch=1)
    assert sorted(e.where for batch in a for e in batch) == sorted(e.where for e in examples)
    # inside the sorting window batches hold neighbouring lengths: padding is at most the spread of a batch
    assert sum(max(map(len, b)) * len(b) for b in a) - sum(map(len, examples)) <= 3 * len(a)


def test_packing_fills_rows_and_never_learns_across_examples():
    examples = _examples([3, 9, 4, 7])
    rows = [r for batch in epoch_batches(examples, 2, "pack", 8, seed=0, epoch=0) for r in batch]
    assert [len(r) for r in rows] == [8, 8, 7]
    assert sum(len(r) for r in rows) == sum(map(len, examples))
    starts = sum(1 for r in rows for lab in r.labels if lab == IGNORE_INDEX)
    assert starts == len(examples)  # exactly the first token of each example carries no label


def test_split_and_collate():
    examples = _examples([3, 4, 5, 6, 7, 8, 9, 10, 11, 12])
    train, held = split_train_eval(examples, 0.2, seed=0)
    assert len(held) == 2 and len(train) == 8 and not {e.where for e in held} & {e.where for e in train}
    with pytest.raises(SlimlmError, match="too few"):
        split_train_eval(examples[:1], 0.5, seed=0)
    batch = collate([examples[0], examples[2]], pad_id=0)
    assert batch.input_ids.shape == (2, 5)
    assert batch.labels[0, 3:].tolist() == [IGNORE_INDEX] * 2 and batch.num_loss_tokens == 2 + 4


def test_padded_batch_loss_equals_the_sum_of_single_sequence_losses(tiny):
    torch.manual_seed(0)
    a = Example([5, 6, 7, 8, 9, 10], [IGNORE_INDEX, IGNORE_INDEX, 7, 8, 9, 10], "a")
    b = Example([11, 12, 13], [11, 12, 13], "b")
    loss = CausalLMLoss(tiny.model, chunk_tokens=2)
    with torch.no_grad():
        total, n = loss(*vars(collate([a, b], pad_id=0)).values())
        parts = []
        for e in (a, b):
            logits = tiny.model.forward_dense(torch.tensor([e.input_ids]))[0, :-1]
            labels = torch.tensor(e.labels[1:])
            keep = labels != IGNORE_INDEX
            parts.append(torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum"))
    assert int(n) == 4 + 2
    torch.testing.assert_close(total, sum(parts), rtol=1e-5, atol=1e-5)
