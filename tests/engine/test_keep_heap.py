"""slimlm.heap.keep_freed_heap: a step's freed activations are reused, not faulted in afresh each step.

Each case runs in a fresh process (the setting is process-wide) and counts the minor page faults of the
second of two identical "steps": tensors of a prefill's activation sizes, written, then all freed.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt (Linux)")

_STEP = """
import json, resource, sys, torch
from slimlm.heap import keep_freed_heap
kept = keep_freed_heap() if sys.argv[1] == "keep" else False

def step():
    # a 16 x 128-token SmolLM2 prefill's sizes: 2.4 to 12.6 MB per tensor, ~150 MB in all, then freed
    live = [torch.empty(int(mb * 2**20), dtype=torch.uint8).fill_(1) for mb in (2.4, 3.9, 6.3, 12.6) * 6]
    del live

step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
step()
print(json.dumps({"kept": kept, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def _second_step_faults(mode: str) -> dict:
    done = subprocess.run([sys.executable, "-c", _STEP, mode], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_kept_heap_serves_the_next_step_without_page_faults():
    kept = _second_step_faults("keep")
    if not kept["kept"]:
        pytest.skip("this C library has no mallopt: the default heap behaviour stays")
    default = _second_step_faults("default")
    pages = int(6 * (2.4 + 3.9 + 6.3 + 12.6) * 2**20) // resource.getpagesize()
    # glibc's defaults hand much of those pages back and fault them in again on the next step
    assert default["faults"] > pages // 5, default
    assert kept["faults"] < default["faults"] // 5, (kept, default)


def test_the_engine_keeps_the_heap(smollm):
    from slimlm.engine.llm import LLM
    from slimlm.heap import keep_freed_heap

    keep_freed_heap.cache_clear()
    LLM.from_loaded(smollm, kv_cache_tokens=64)
    assert keep_freed_heap.cache_info().currsize == 1  # called once the engine is built
