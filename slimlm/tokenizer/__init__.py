"""Tokenizers for slimlm: HF `tokenizers` for text <-> ids, Jinja chat templates, streaming detokenization.

from slimlm.tokenizer import Tokenizer
tok = Tokenizer.from_hf_dir("path/to/model")          # or Tokenizer.from_gguf(gguf_fields(reader))
ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=True)
"""

from slimlm.tokenizer.core import Tokenizer
from slimlm.tokenizer.gguf_metadata import gguf_fields, read_gguf_metadata
from slimlm.tokenizer.incremental import IncrementalDecoder

__all__ = ["IncrementalDecoder", "Tokenizer", "gguf_fields", "read_gguf_metadata"]
