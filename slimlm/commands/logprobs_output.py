"""How `slimlm generate --logprobs N` shows log-probabilities: JSON records and a plain-text table."""

from __future__ import annotations


def logprob_records(tokenizer, entries) -> list[dict]:
    """One record per generated token, shaped like OpenAI's chat `logprobs.content` entries."""

    def token(token_id: int) -> str:
        return tokenizer.decode([token_id], skip_special_tokens=False)

    return [
        {
            "token": token(e.token_id),
            "token_id": e.token_id,
            "logprob": e.logprob,
            "top_logprobs": [{"token": token(t), "token_id": t, "logprob": lp} for t, lp in e.top],
        }
        for e in entries
    ]


def logprob_table(records: list[dict]) -> str:
    """A line per token: the token, its log-probability, then the top alternatives."""
    lines = []
    for r in records:
        line = f"{r['token']!r:>16} {r['logprob']:9.4f}"
        if r["top_logprobs"]:
            line += "  | " + ", ".join(f"{t['token']!r} {t['logprob']:.4f}" for t in r["top_logprobs"])
        lines.append(line)
    return "\n".join(lines)
