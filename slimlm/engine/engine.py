"""The step loop: schedule -> run -> sample -> postprocess. Everything else lives in its own file."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from slimlm.config import ModelConfig
from slimlm.engine.block_manager import BlockManager
from slimlm.engine.config import EngineConfig
from slimlm.engine.constraints import Constraints
from slimlm.engine.detokenize import StopChecker
from slimlm.engine.memory import KVBudget, allocate_kv_pool, free_memory_bytes, plan_kv_blocks
from slimlm.engine.params import SamplingParams
from slimlm.engine.runner import ModelRunner
from slimlm.engine.sampler import Sampler
from slimlm.engine.scheduler import Scheduler
from slimlm.engine.sequence import Sequence
from slimlm.errors import SlimlmError
from slimlm.heap import keep_freed_heap
from slimlm.kv import kv_cache_class, kv_storage_dtype, make_kv_cache


@dataclass
class StepOutput:
    """What one step produced for one sequence."""

    seq_id: int
    token_id: int | None  # None when the scheduler ended the sequence without a new token
    text: str  # newly decoded text (may be "" while a multi-byte character is incomplete)
    finished: bool
    finish_reason: str | None = None
    logprob: object = None


@dataclass
class EngineStats:
    prompt_tokens: int = 0
    # prompt tokens actually run through the model (not from the prefix cache)
    computed_prompt_tokens: int = 0
    generated_tokens: int = 0
    steps: int = 0
    preemptions: int = 0
    requests_finished: int = 0
    last_prefill_tokens: list[int] = field(default_factory=list)


class LLMEngine:
    """Owns the KV pool, the scheduler and the runner; `step()` advances every running request by a token."""

    def __init__(
        self, model, model_config: ModelConfig, tokenizer, config: EngineConfig, device: torch.device
    ) -> None:
        self.model = model
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.config = config
        self.device = device
        compute_dtype = next(model.parameters()).dtype
        self.max_model_len = config.max_model_len or model_config.max_position_embeddings
        cache_cls = kv_cache_class(config.kv_dtype)
        block_bytes = cache_cls.bytes_per_block(
            model_config, config.block_size, kv_storage_dtype(config.kv_dtype, compute_dtype)
        )
        free_bytes = free_memory_bytes(device)
        self.budget: KVBudget = plan_kv_blocks(
            block_bytes=block_bytes,
            block_size=config.block_size,
            free_bytes=free_bytes,
            cache_max_entry_count=config.cache_max_entry_count,
            kv_cache_tokens=config.kv_cache_tokens,
            kv_cache_bytes=_blocks_share_of(config, model_config),
            max_num_seqs=config.max_num_seqs,
            max_model_len=self.max_model_len,
        )
        self.cache = allocate_kv_pool(
            lambda: make_kv_cache(
                model_config,
                self.budget.num_blocks,
                config.block_size,
                config.kv_dtype,
                compute_dtype,
                device,
                max_seqs=config.max_num_seqs,
            ),
            self.budget,
            free_bytes,
            device,
        )
        self.block_manager = BlockManager(
            self.budget.num_blocks, config.block_size, config.enable_prefix_caching
        )
        # the int4 pool keeps unfinished blocks in staging slots: a freed one gives its slot back
        self.block_manager.on_release = getattr(self.cache, "release_block", None)
        if hasattr(self.cache, "forget_cached"):  # and takes back cached sink blocks' slots when short
            self.cache.forget_cached = self.block_manager.forget_cached
        self.eos_token_ids = list(model_config.eos_token_ids or tokenizer.eos_token_ids)
        self.scheduler = Scheduler(
            self.block_manager,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=self.max_model_len,
            eos_token_ids=self.eos_token_ids,
        )
        from slimlm.engine.backend import choose_backend

        self.backend = choose_backend(model, self.cache, config, self.max_model_len)
        self.decode_backend = self.backend.description  # what decode steps run on (a sentence), for reports
        self.runner = ModelRunner(model, self.cache, config.block_size, device, self.backend.decoder)
        self.sampler = Sampler(device, self.eos_token_ids)
        self.constraints = Constraints(tokenizer, model_config.vocab_size, self.eos_token_ids)
        self.stop_checkers: dict[int, StopChecker] = {}
        self.seqs: dict[int, Sequence] = {}
        self.stats = EngineStats()
        keep_freed_heap()  # steps reuse their activations' pages instead of faulting them in (slimlm/heap.py)

    # ---- requests ----
    def add_request(
        self, prompt_token_ids: list[int], params: SamplingParams, seq_id: int | None = None
    ) -> Sequence:
        if len(prompt_token_ids) >= self.max_model_len:
            raise SlimlmError(
                f"the prompt has {len(prompt_token_ids)} tokens but the context limit is {self.max_model_len}; "
                "shorten it, or raise --max-model-len where the model can run longer"
            )
        if params.num_beams > 1:
            raise SlimlmError("beam search runs through LLM.generate, not add_request")
        seq = Sequence(prompt_token_ids, params, seq_id)
        if seq.seq_id in self.seqs:
            raise SlimlmError(f"sequence id {seq.seq_id} is already running; give each request its own id")
        # Everything that can fail runs before the scheduler sees the sequence, and a failure undoes
        # what was registered: a half-added sequence would break the next step of every request.
        checker = StopChecker(self.tokenizer, params)
        self.constraints.register(seq.seq_id, params.structured_outputs)  # raises on a bad grammar
        try:
            self.sampler.register(seq)
            self.scheduler.add(seq)
        except BaseException:
            self.sampler.forget(seq.seq_id)
            self.constraints.forget(seq.seq_id)
            raise
        self.seqs[seq.seq_id] = seq
        self.stop_checkers[seq.seq_id] = checker
        self.stats.prompt_tokens += len(prompt_token_ids)
        return seq

    def abort(self, seq_id: int) -> None:
        if seq_id in self.seqs:
            self.scheduler.abort(seq_id)
            self._forget(seq_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- the loop ----
    def step(self) -> list[StepOutput]:
        batch = self.scheduler.schedule()
        seqs = batch.seqs
        outputs = [self._ended_by_scheduler(seq) for seq in batch.finished]
        if not seqs:
            return outputs
        if batch.is_prefill:
            computed = [s.num_tokens - s.num_cached_tokens for s in seqs]
            self.stats.computed_prompt_tokens += sum(computed)
            self.stats.last_prefill_tokens = computed
        logits = self.runner.run(seqs, batch.is_prefill)
        if self.constraints:
            logits = self.constraints.mask(logits, seqs)
        token_ids, logprobs = self.sampler(logits, seqs)
        self.scheduler.postprocess(seqs, token_ids, logprobs)
        if self.constraints:
            for seq in self.constraints.advance(seqs, token_ids):
                self.scheduler.finish(seq, "stop")  # the grammar is complete
        self.stats.steps += 1
        self.stats.preemptions = self.scheduler.num_preemptions
        for seq, token in zip(seqs, token_ids, strict=True):
            self.stats.generated_tokens += 1
            checker = self.stop_checkers[seq.seq_id]
            text = checker.push(token)
            if not seq.is_finished and checker.stopped:
                self.scheduler.finish(seq, "stop")
            if seq.is_finished:
                text += checker.flush()
            outputs.append(
                StepOutput(
                    seq.seq_id,
                    token,
                    text,
                    seq.is_finished,
                    seq.finish_reason,
                    seq.output_logprobs[-1] if seq.output_logprobs else None,
                )
            )
            if seq.is_finished:
                self.stats.requests_finished += 1
                self._forget(seq.seq_id)
        return outputs

    def _ended_by_scheduler(self, seq: Sequence) -> StepOutput:
        checker = self.stop_checkers.get(seq.seq_id)
        text = checker.flush() if checker else ""
        self.stats.requests_finished += 1
        self._forget(seq.seq_id)
        return StepOutput(seq.seq_id, None, text, True, seq.finish_reason)

    def _forget(self, seq_id: int) -> None:
        self.seqs.pop(seq_id, None)
        self.sampler.forget(seq_id)
        self.constraints.forget(seq_id)
        self.stop_checkers.pop(seq_id, None)


def _blocks_share_of(config: EngineConfig, model_config) -> int | None:
    """--kv-cache-bytes less the int4 pool's bf16 staging slots (slimlm/kv/kivi.py), so the whole pool,
    staging included, stays within the bytes the user gave."""
    from slimlm.plan.inference import kv_staging_bytes

    if config.kv_cache_bytes is None:
        return None
    if config.kv_dtype in ("auto", "bf16", "fp16", "fp32", "int8", "k8v4"):  # pools without staging
        return config.kv_cache_bytes
    staging = kv_staging_bytes(model_config, config.kv_dtype, config.block_size, config.max_num_seqs)
    if staging and staging >= config.kv_cache_bytes:
        raise SlimlmError(
            f"--kv-cache-bytes {config.kv_cache_bytes}: the int4 KV pool's bf16 staging for "
            f"{config.max_num_seqs} sequences alone needs {staging} bytes; raise --kv-cache-bytes or lower "
            "--max-num-seqs"
        )
    return config.kv_cache_bytes - staging
