"""The public Python API: `LLM(...).generate(prompts, SamplingParams)` and a streaming generator."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from slimlm.devices import torch_device
from slimlm.engine.backend import KEEP_LAYOUT, auto_weights_layout  # noqa: F401  (re-exported)
from slimlm.engine.config import EngineConfig
from slimlm.engine.engine import LLMEngine, StepOutput
from slimlm.engine.memory import format_bytes
from slimlm.engine.outputs import RequestOutput  # noqa: F401  (re-exported: callers import it from here)
from slimlm.engine.params import SamplingParams
from slimlm.errors import SlimlmError


def resolve_dtype(dtype: str, device: torch.device) -> str:
    """'auto' -> bfloat16 where the hardware has fast bf16 matmuls (docs/measured_choices.md), else float32."""
    if dtype != "auto":
        return dtype
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return (
        "bfloat16"
        if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        else "float32"
    )


def _distinct_tensor_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of these tensors, each storage once (a tied table is a parameter and a buffer at once)."""
    seen: dict[object, int] = {}
    for t in tensors:
        try:
            key: object = (t.data_ptr(), t.numel(), t.dtype)
        except (RuntimeError, NotImplementedError):  # oneDNN-packed tensors have no plain storage
            key = id(t)
        seen[key] = t.numel() * t.element_size()
    return sum(seen.values())


class LLM:
    """Load a model and serve generation requests through the paged, continuously batched engine."""

    def __init__(
        self,
        model: str | None = None,
        dtype: str = "auto",
        device: str | torch.device = "auto",
        engine_config: EngineConfig | None = None,
        progress: bool = True,
        weights_layout: str | None = None,
        weights: str = "float",
        **engine_kwargs: Any,
    ) -> None:
        """`weights`: "native" runs a GGUF's Q4_0/Q4_1/Q8_0 blocks as they are, "float" dequantizes
        them to `dtype` (slimlm.loading.load)."""
        from slimlm.engine.backend import quantized_layout
        from slimlm.loading import load, parse_dtype

        engine_config = _engine_config(engine_config, engine_kwargs, weights_layout, "auto")
        self.device = torch_device(device)
        dtype = resolve_dtype(dtype, self.device)
        loaded = load(
            model,
            dtype=dtype,
            device=self.device,
            progress=progress,
            weights=weights,
            quantized_layout=quantized_layout(engine_config, self.device, parse_dtype(dtype)),
        )
        self._init(loaded, engine_config)

    @classmethod
    def from_loaded(
        cls,
        loaded,
        engine_config: EngineConfig | None = None,
        weights_layout: str | None = None,
        **engine_kwargs: Any,
    ) -> LLM:
        """Build an engine over an already loaded model (tests, benchmarks, several engines on one model).

        `weights_layout` re-lays the model's linears for CPU inference in place (see
        slimlm.engine.backend), which makes that model inference-only; None (default) leaves the model
        as it is, because the caller owns it.
        """
        self = cls.__new__(cls)
        self.device = next(loaded.model.parameters()).device
        self._init(loaded, _engine_config(engine_config, engine_kwargs, weights_layout, KEEP_LAYOUT))
        return self

    def _init(self, loaded, engine_config: EngineConfig) -> None:
        self.loaded = loaded
        self.tokenizer = self.loaded.tokenizer
        self.config = self.loaded.config
        self.engine = LLMEngine(self.loaded.model, self.config, self.tokenizer, engine_config, self.device)
        self.weights_layout = self.engine.backend.weights_layout
        self._next_id = 0

    # ---- prompts ----
    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise SlimlmError("the prompt is empty")
            return self.tokenizer.encode(prompt)
        if not prompt or not all(isinstance(t, int) and 0 <= t < self.config.vocab_size for t in prompt):
            raise SlimlmError(
                f"token-id prompts must be non-empty lists of ids in [0, {self.config.vocab_size})"
            )
        return list(prompt)

    def chat_prompt(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tools=tools)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    # ---- generation ----
    def generate(
        self,
        prompts: str | list[int] | list[str] | list[list[int]],
        params: SamplingParams | list[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Generate for all prompts together (continuous batching); results in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        params_list = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if len(params_list) != len(prompts):
            raise SlimlmError(f"got {len(prompts)} prompts but {len(params_list)} SamplingParams")
        encoded = [self.encode_prompt(p) for p in prompts]
        results: dict[int, RequestOutput] = {}
        order: list[int] = []
        beams = []
        for ids, sp in zip(encoded, params_list, strict=True):
            seq_id = self._new_id()
            order.append(seq_id)
            if sp.num_beams > 1:
                beams.append((seq_id, ids, sp))
                continue
            seq = self.engine.add_request(ids, sp, seq_id)
            results[seq_id] = RequestOutput(ids, [], "", None)
            results[seq_id]._seq = seq  # type: ignore[attr-defined]
        try:
            while self.engine.has_unfinished():
                for out in self.engine.step():
                    self._collect(results[out.seq_id], out)
        except BaseException:
            for seq_id in list(results):
                self.engine.abort(seq_id)
            raise
        for seq_id, ids, sp in beams:
            from slimlm.engine.beam import beam_search

            results[seq_id] = beam_search(self, ids, sp)
        for res in results.values():
            seq = getattr(res, "_seq", None)
            if seq is not None:
                res.num_cached_tokens = getattr(seq, "num_prefix_hit_tokens", 0)
                del res._seq  # type: ignore[attr-defined]
        return [results[i] for i in order]

    @staticmethod
    def _collect(res: RequestOutput, out: StepOutput) -> None:
        if out.token_id is not None:
            res.token_ids.append(out.token_id)
        res.text += out.text
        if out.logprob is not None:
            res.logprobs.append(out.logprob)
        if out.finished:
            res.finish_reason = out.finish_reason

    def stream(self, prompt: str | list[int], params: SamplingParams | None = None) -> Iterator[StepOutput]:
        """Yields a StepOutput per generated token; closing the generator aborts the request."""
        params = params or SamplingParams()
        if params.num_beams > 1:
            raise SlimlmError("beam search cannot stream; use generate()")
        seq = self.engine.add_request(self.encode_prompt(prompt), params, self._new_id())
        finished = False
        try:
            while not finished:
                for out in self.engine.step():
                    if out.seq_id == seq.seq_id:
                        finished = out.finished
                        yield out
        finally:
            if not finished:
                self.engine.abort(seq.seq_id)

    # ---- reporting ----
    def memory_report(self) -> dict[str, Any]:
        """Bytes actually allocated: weights and the KV pool, and what the pool holds."""
        engine = self.engine
        weights = _distinct_tensor_bytes([*self.loaded.model.parameters(), *self.loaded.model.buffers()])
        tokens = engine.budget.num_blocks * engine.config.block_size
        per_seq_blocks = -(-engine.max_model_len // engine.config.block_size)
        return {
            "weights_bytes": weights,
            "kv_pool_bytes": engine.cache.nbytes,
            "kv_dtype": getattr(engine.cache, "kv_dtype", "?"),
            "kv_tokens": tokens,
            "kv_blocks": engine.budget.num_blocks,
            "block_size": engine.config.block_size,
            "max_model_len": engine.max_model_len,
            "max_concurrent_seqs_at_max_len": engine.budget.num_blocks // per_seq_blocks,
            "budget": engine.budget.source,
            "dtype": str(next(self.loaded.model.parameters()).dtype).removeprefix("torch."),
            "weights_layout": engine.backend.weights_layout,
            "weights_format": engine.backend.weights,
            "decode_kernel": engine.backend.description,
            "decode_kernel_scratch_bytes": engine.backend.scratch_bytes,
            "notes": list(engine.backend.notes) + list(getattr(self.loaded, "notes", [])),
            "device": str(self.device),
        }

    def memory_report_text(self) -> str:
        r = self.memory_report()
        return (
            f"weights {format_bytes(r['weights_bytes'])} ({r['dtype']}, {r['device']}, "
            f"{r['weights_layout']} layout; {r['weights_format']}; decode steps on {r['decode_kernel']}) | "
            f"KV pool {format_bytes(r['kv_pool_bytes'])} ({r['kv_dtype']}): {r['kv_tokens']} tokens in "
            f"{r['kv_blocks']} blocks of {r['block_size']} | {_capacity_text(r)} | budget: {r['budget']}"
            + "".join(f" | note: {n}" for n in r["notes"])
        )


def _capacity_text(r: dict[str, Any]) -> str:
    """ "max 0 sequences at 8192 tokens" read as "nothing can run": a pool smaller than one full-length
    sequence says how long one sequence can get instead."""
    if r["max_concurrent_seqs_at_max_len"] >= 1:
        return f"max {r['max_concurrent_seqs_at_max_len']} sequences at {r['max_model_len']} tokens"
    return (
        f"one sequence can have up to {min(r['kv_tokens'], r['max_model_len'])} tokens (prompt + output; "
        f"the model's context is {r['max_model_len']})"
    )


def _engine_config(
    engine_config: EngineConfig | None, kwargs: dict[str, Any], weights_layout: str | None, default: str
) -> EngineConfig:
    """One EngineConfig from either a config or keyword arguments; `weights_layout` (the LLM argument)
    overrides, and `default` applies when neither names one."""
    import dataclasses

    if engine_config is not None and kwargs:
        raise SlimlmError("pass either engine_config or engine keyword arguments, not both")
    if engine_config is None:
        kwargs.setdefault("weights_layout", weights_layout or default)
        return EngineConfig(**kwargs)
    if weights_layout is not None:
        return dataclasses.replace(engine_config, weights_layout=weights_layout)
    return engine_config
