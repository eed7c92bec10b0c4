"""Plot the loss curves of benchmarks/optim_finetune.py (needs matplotlib: `pip install matplotlib`).

python benchmarks/optim_plot.py [--json benchmarks/results/optim_finetune.json] [--out docs/optim_loss_curves.png]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def smooth(values: list[float], weight: float = 0.8) -> list[float]:
    """Exponential moving average, so that curves on identical batches can be told apart."""
    out, last = [], values[0]
    for v in values:
        last = weight * last + (1 - weight) * v
        out.append(last)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "optim_finetune.json")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "optim_loss_curves.png")
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    result = json.loads(args.json.read_text())
    setup = result["setup"]
    fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=90)
    for name, run in result["runs"].items():
        steps = range(1, len(run["losses"]) + 1)
        style = "-" if name.startswith(("torch", "slimlm")) else "--"
        label = f"{name} (eval ppl {run['eval_perplexity']:.2f}, state {run['state_bytes_vs_fp32']:.2f}x)"
        ax.plot(steps, smooth(run["losses"]), style, linewidth=1.4, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (EMA 0.8)")
    layers = f"last {setup['train_layers']} layers" if setup.get("train_layers") else "all layers"
    ax.set_title(
        f"SmolLM2-135M fine-tune on CPU ({layers}), "
        f"batch {setup['batch']}x{setup['seq_len']} tokens, lr {setup['lr']}",
        fontsize=10,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
