"""Interleaved benchmark rounds (slimlm/bench/rounds.py): real child processes speaking the protocol.

Each child here is a tiny Python process whose "measurement" is the wall-clock order in which it was
called, so the test can see the rotation, the pairing of ratios within a round and a failing child."""

import sys
import textwrap

import pytest

from slimlm.bench.rounds import add_ratios, run_rounds

CHILD = textwrap.dedent(
    """
    import sys, time
    from slimlm.bench.rounds import serve_rounds

    speed, fail_at = float(sys.argv[1]), int(sys.argv[2])

    class Child:
        runs = []
        def run(self):
            if len(self.runs) == fail_at:
                print("child broke on purpose", file=sys.stderr)
                raise SystemExit(3)
            self.runs.append({"ttft_s": 1 / speed, "decode_tok_s": speed * (1 + len(self.runs)),
                              "throughput_tok_s": speed, "t": time.monotonic()})
            return self.runs[-1]
        def result(self):
            return {"decode_tok_s": self.runs[-1]["decode_tok_s"], "peak_rss_bytes": int(speed * 100),
                    "times": [r["t"] for r in self.runs]}

    serve_rounds(Child())
    """
)


def child(speed: float, fail_at: int = -1) -> list[str]:
    return [sys.executable, "-c", CHILD, str(speed), str(fail_at)]


def test_rounds_rotate_the_order_and_pair_ratios_within_each_round():
    rows = run_rounds({"bf16": child(10), "w4": child(30), "w8": child(15)}, rounds=3, log=lambda _: None)
    assert list(rows) == ["bf16", "w4", "w8"]
    # every run of w4 is 3x bf16's in the same round, although both speed up round by round
    assert rows["w4"]["decode_tok_s_vs_bf16_rounds"] == pytest.approx([3.0, 3.0, 3.0])
    assert rows["w8"]["decode_tok_s_vs_bf16"] == pytest.approx(1.5)
    assert rows["bf16"]["ttft_s_vs_bf16"] == pytest.approx(1.0)
    assert rows["w4"]["peak_rss_bytes_vs_bf16"] == pytest.approx(3.0)
    # round r starts with child r: bf16 first in round 1, w4 first in round 2, w8 first in round 3
    firsts = []
    for r in range(3):
        starts = {name: rows[name]["times"][r] for name in rows}
        firsts.append(min(starts, key=starts.get))
    assert firsts == ["bf16", "w4", "w8"]


def test_a_child_that_fails_is_reported_and_the_others_go_on():
    rows = run_rounds({"bf16": child(10), "broken": child(20, fail_at=1), "gone": [sys.executable, "-c",
                       "import sys; print('no model here', file=sys.stderr); sys.exit(2)"]},
                      rounds=3, log=lambda _: None)  # fmt: skip
    assert rows["broken"] == {"error": "child broke on purpose"}
    assert rows["gone"] == {"error": "no model here"}
    assert rows["bf16"]["decode_tok_s"] == pytest.approx(30.0)  # its third run


def test_no_ratio_against_a_reference_that_failed():
    rows = {"bf16": {"error": "x"}, "w4": {"decode_tok_s": 2.0}}
    add_ratios(rows, [{"w4": {"decode_tok_s": 2.0}}])
    assert "decode_tok_s_vs_bf16" not in rows["w4"]


def test_the_roofline_uses_one_bandwidth_for_every_variant_the_highest_measured():
    from slimlm.bench.variants import add_roofline

    rows = {"bf16": {"decode_tok_s": 100.0, "bytes_per_token": 2e8},
            "w4": {"decode_tok_s": 300.0, "bytes_per_token": 5e7},
            "llama.cpp": {"decode_tok_s": 120.0}}  # fmt: skip
    add_roofline(rows, [30e9, 40e9])
    assert rows["bf16"]["read_bandwidth_gb_s"] == rows["w4"]["read_bandwidth_gb_s"] == 40.0
    assert rows["bf16"]["read_bandwidth_measured_gb_s"] == [30.0, 40.0]
    assert rows["bf16"]["roofline_tok_s"] == pytest.approx(200.0)
    assert rows["bf16"]["roofline_fraction"] == pytest.approx(0.5)
    assert rows["w4"]["roofline_fraction"] == pytest.approx(300 * 5e7 / 40e9)
    assert "roofline_fraction" not in rows["llama.cpp"]  # no bytes reported: no roofline invented


def test_the_bandwidth_is_measured_in_a_fresh_process():
    from slimlm.bench.variants import fresh_read_bandwidth

    bandwidth = fresh_read_bandwidth()
    assert 1e8 < bandwidth < 1e13  # bytes/s: a real figure, neither zero nor absurd
