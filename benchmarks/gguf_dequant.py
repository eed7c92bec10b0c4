"""slimlm's numpy GGUF dequantizers (slimlm/loading/gguf_kquants.py) against the gguf package's
`gguf.quants.dequantize` on the tensors of a real file, type by type: seconds per pass (median of runs)
and whether the values are identical.

    python benchmarks/gguf_dequant.py [--model gemma3-270m] [--runs 3]

Writes benchmarks/results/gguf_dequant.json.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from slimlm.loading.default_model import resolve_model_path
from slimlm.loading.gguf_file import GGUFFile
from slimlm.loading.gguf_kquants import DEQUANTIZERS

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    from gguf import GGMLQuantizationType, quants

    path = resolve_model_path(args.model)
    rows = {}
    with GGUFFile(path) as file:
        by_type: dict[int, list] = {}
        for info in file.tensors:
            if info.qtype in DEQUANTIZERS:
                by_type.setdefault(info.qtype, []).append(info)
        for qtype, infos in sorted(by_type.items()):
            name = GGMLQuantizationType(qtype).name
            raws = [np.array(file.raw(i)) for i in infos]  # copied out of the map: times exclude disk
            times = {"slimlm": [], "gguf": []}
            equal = True
            for _ in range(args.runs):
                for who, fn in (
                    ("slimlm", lambda r, t=qtype: DEQUANTIZERS[t](r)),
                    ("gguf", lambda r, t=qtype: quants.dequantize(r, t)),
                ):
                    start = time.perf_counter()
                    outs = [fn(r) for r in raws]
                    times[who].append(time.perf_counter() - start)
                    if who == "slimlm":
                        ours = outs
                    else:
                        equal = equal and all(
                            np.array_equal(a, b, equal_nan=True) for a, b in zip(ours, outs, strict=True)
                        )
            elements = sum(int(np.prod(i.shape)) for i in infos)
            rows[name] = {
                "tensors": len(infos),
                "elements": elements,
                "slimlm_s": statistics.median(times["slimlm"]),
                "gguf_s": statistics.median(times["gguf"]),
                "identical": bool(equal),
            }
            r = rows[name]
            print(
                f"{name:6} {len(infos):4} tensors {elements / 1e6:8.1f} M elements  slimlm {r['slimlm_s']:.3f} s  "
                f"gguf {r['gguf_s']:.3f} s  ({r['gguf_s'] / r['slimlm_s']:.2f}x)  identical={equal}"
            )
    out = Path(__file__).parent / "results" / "gguf_dequant.json"
    out.write_text(json.dumps({"model": str(path), "runs": args.runs, "types": rows}, indent=2))
    print(f"wrote {out}")
