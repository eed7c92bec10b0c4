"""Write a Tokenizer as an HF directory (tokenizer.json + tokenizer_config.json) that transformers and
`Tokenizer.from_hf_dir` both read: quantized, merged and fine-tuned checkpoints carry their tokenizer."""

from __future__ import annotations

import json
from pathlib import Path


def save_tokenizer(tokenizer, out_dir: str | Path) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.backend.save(str(out / "tokenizer.json"))
    config = {key: value for key, value in tokenizer.special_tokens.items() if value is not None}
    if tokenizer.chat_template is not None:
        template = tokenizer.chat_template
        config["chat_template"] = (
            [{"name": k, "template": v} for k, v in template.items()]
            if isinstance(template, dict)
            else template
        )
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    if tokenizer.eos_token_ids:
        gen = {
            "eos_token_id": tokenizer.eos_token_ids
            if len(tokenizer.eos_token_ids) > 1
            else tokenizer.eos_token_ids[0]
        }
        if tokenizer.bos_token_id is not None:
            gen["bos_token_id"] = tokenizer.bos_token_id
        (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
