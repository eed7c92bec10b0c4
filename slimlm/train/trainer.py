"""The training loop: `train(TrainConfig) -> TrainResult`.

Everything that can be wrong (settings, data, model, LoRA targets, a resume checkpoint) is checked
before the output directory is touched. One optimizer step consumes world_size x grad_accum
micro-batches; the loss is the sum of token cross-entropies over the whole step divided by the step's
number of loss tokens, so accumulation and data parallelism give the gradient of one big batch.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from slimlm.errors import SlimlmError
from slimlm.train import checkpoint as ckpt
from slimlm.train import distributed as dist
from slimlm.train import optim_shards as shards
from slimlm.train.batching import collate, epoch_batches, split_train_eval
from slimlm.train.config import TrainConfig
from slimlm.train.data import Example, load_examples
from slimlm.train.loss import CausalLMLoss
from slimlm.train.memory import StepMemory, fmt_bytes, model_tensors, peak_rss_bytes, planned_peak
from slimlm.train.model_setup import (
    PreparedModel,
    decoder_layers,
    load_base,
    prepare_model,
    qlora_group_size,
    rank_device,
    resolve_precision,
)
from slimlm.train.optimization import build_optimizer, build_scheduler
from slimlm.train.progress import TrainProgress

LOG_FILE = "train_log.jsonl"
SUMMARY_FILE = "train_summary.json"


@dataclass
class TrainResult:
    output_dir: Path
    state: ckpt.TrainerState
    losses: list[float]  # training loss of every step run by this call (resumed runs: from the resume on)
    evals: list[dict] = field(default_factory=list)
    measured_peak_bytes: int | None = None
    peak_rss_bytes: int | None = None
    planned_peak_bytes: int | None = None
    rank: int = 0  # this process's rank (results are reported by rank 0)


class Trainer:
    """Set up a run (all checks first), then `run()` it. `loaded`: an already loaded model to train."""

    def __init__(self, cfg: TrainConfig, loaded=None) -> None:
        self.cfg = cfg
        self.dist = dist.init_distributed(cfg.distributed, "cuda" if cfg.device.startswith("cuda") or (
            cfg.device == "auto" and torch.cuda.is_available()) else "cpu")  # fmt: skip
        try:
            self._setup(loaded)
        except BaseException:
            dist.shutdown(self.dist)  # a process group this run opened must not outlive it
            raise

    def _setup(self, loaded) -> None:
        cfg = self.cfg
        self.device = rank_device(cfg.device, self.dist.local_rank)
        self.out = Path(cfg.output_dir)
        self.resume_from = self._check_output_dir()
        self.precision = resolve_precision(cfg.precision, self.device)
        loaded = loaded or load_base(cfg, self.device, cfg.progress and self.dist.is_main)
        self.tokenizer = loaded.tokenizer
        self.train_examples, self.eval_examples, self.data_stats = self._load_data()
        torch.manual_seed(cfg.seed)  # the same LoRA initialisation on every process
        self.prepared: PreparedModel = prepare_model(cfg, loaded, self.precision)
        self.model = self.prepared.model
        self.loss_module = CausalLMLoss(self.model, cfg.loss_chunk_tokens).to(self.device)
        self.fingerprint = ckpt.fingerprint(cfg.trajectory(), loaded.config.to_hf_dict(), cfg.data, cfg.eval_data,
                                            self.dist.world_size)  # fmt: skip
        resumed = None
        if self.resume_from is not None:
            state, saved_fp = ckpt.read_checkpoint_state(self.resume_from)
            ckpt.check_fingerprint(saved_fp, self.fingerprint, self.resume_from)
            resumed = ckpt.load_checkpoint(self.resume_from, self.dist.rank, self.device)
        self.per_step = self.dist.world_size * cfg.grad_accum
        self.steps_per_epoch = self._steps_per_epoch()
        self.total_steps = cfg.max_steps or cfg.epochs * self.steps_per_epoch
        fsdp_offload = cfg.offload_optimizer and self.dist.strategy == "fsdp"
        self.wrapped = dist.wrap_model(self.loss_module, self.dist, self.device, decoder_layers(self.model),
                                       offload=fsdp_offload)  # fmt: skip
        state_device = (
            "cpu" if cfg.offload_optimizer and not fsdp_offload and self.device.type != "cpu" else None
        )
        self.optimizer = build_optimizer(self.model, cfg.optim, cfg.lr, cfg.weight_decay, state_device)
        self.scheduler = build_scheduler(self.optimizer, self.total_steps, cfg.warmup_steps, cfg.warmup_ratio,
                                         cfg.schedule, cfg.min_lr_ratio)  # fmt: skip
        self.pad_id = next(
            i for i in (self.tokenizer.pad_token_id, *self.tokenizer.eos_token_ids, 0) if i is not None
        )
        self.state = ckpt.TrainerState()
        if resumed is not None:
            self._restore(resumed)
        else:
            torch.manual_seed(cfg.seed + 1 + self.dist.rank)  # dropout differs across processes
            random.seed(cfg.seed + self.dist.rank)
        self.eval_batches = epoch_batches(self.eval_examples, cfg.batch_size, "bucket", cfg.max_seq_len, cfg.seed, 0,
                                          shuffle=False) if self.eval_examples else []  # fmt: skip

    # -- setup ------------------------------------------------------------------------------------------

    def _check_output_dir(self) -> Path | None:
        cfg = self.cfg
        if self.out.exists() and not self.out.is_dir():
            raise SlimlmError(f"--output {self.out} exists and is not a directory")
        self._check_not_in_model()
        if cfg.resume:
            return ckpt.find_resume_checkpoint(self.out, cfg.resume)
        if self.out.is_dir() and any(self.out.iterdir()) and not cfg.overwrite:
            raise SlimlmError(
                f"output directory {self.out} is not empty; pass --resume to continue its run, "
                "--overwrite to replace it, or pick another --output"
            )
        return None

    def _check_not_in_model(self) -> None:
        """The run writes config.json / model.safetensors (full) or adapter files into --output, and
        --overwrite clears its checkpoints: never inside the base model's own directory."""
        from slimlm.loading.default_model import resolve_model_path

        model = resolve_model_path(self.cfg.model).resolve()
        out = self.out.expanduser().resolve()
        if out == model or (model.is_dir() and model in out.parents):
            raise SlimlmError(
                f"--output {out} is inside the base model {model}; choose a directory outside it"
            )

    def _load_data(self) -> tuple[list[Example], list[Example], dict]:
        cfg = self.cfg
        examples, stats = load_examples(self.tokenizer, cfg.data, cfg.max_seq_len)
        if cfg.eval_data:
            held, _ = load_examples(self.tokenizer, cfg.eval_data, cfg.max_seq_len)
            return examples, held, stats
        train, held = split_train_eval(examples, cfg.eval_fraction, cfg.seed)
        return train, held, stats

    def _steps_in(self, n_batches: int) -> int:
        # Every process must run the same number of micro-batches: distributed runs drop an uneven tail.
        return n_batches // self.per_step if self.dist.enabled else math.ceil(n_batches / self.per_step)

    def _steps_per_epoch(self) -> int:
        n = len(epoch_batches(self.train_examples, self.cfg.batch_size, self.cfg.batching, self.cfg.max_seq_len,
                              self.cfg.seed, 0))  # fmt: skip
        steps = self._steps_in(n)
        if steps == 0:
            raise SlimlmError(
                f"{n} micro-batch(es) per epoch are too few for {self.dist.world_size} process(es) x "
                f"{self.cfg.grad_accum} accumulation steps; add data or lower --batch-size / --grad-accum"
            )
        return steps

    def _restore(self, resumed: ckpt.LoadedCheckpoint) -> None:
        names = {n for n, p in self.model.named_parameters() if p.requires_grad}
        if set(resumed.trainable) != names:
            raise SlimlmError(
                f"checkpoint {resumed.path} holds other trainable tensors than this run; start over with --overwrite"
            )
        dist.load_trainable_state(self.wrapped, self.model, resumed.trainable, self.dist)
        if shards.has_shards(resumed.path):  # low-bit states, resharded to this run's processes
            shards.load_shards(resumed.path, self.optimizer, self.model)
        else:
            dist.load_optimizer_state(self.wrapped, self.optimizer, resumed.optimizer, self.dist)
        self.scheduler.load_state_dict(resumed.scheduler)
        self.state = resumed.state
        ckpt.restore_rng(resumed.rng)
        self._extend_schedule()

    def _extend_schedule(self) -> None:
        """A resume with another --max-steps / --epochs: the checkpoint's schedule (restored above) is
        recomputed for the new total. Warmup keeps its length; the decay is stretched (or shrunk) to end
        at the new last step, so the lr at the resume point is the new schedule's value there (with a
        cosine or linear decay, higher than where a finished run ended)."""
        step, schedule = self.state.step, self.scheduler.lr_lambdas[0]
        if step > self.total_steps:
            raise SlimlmError(
                f"checkpoint {self.resume_from} is at step {step}, past this run's {self.total_steps} steps; "
                "give a larger --max-steps (or --epochs) to extend it"
            )
        self.schedule_note = None
        if schedule.total == self.total_steps:
            return
        old_total, before = schedule.total, self.scheduler.get_last_lr()[0]
        schedule.total = self.total_steps
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs, strict=True):
            group["lr"] = base * schedule(self.scheduler.last_epoch)
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]
        self.schedule_note = (
            f"run length {old_total} -> {self.total_steps} steps: the {schedule.kind} lr schedule is recomputed for "
            f"{self.total_steps} steps (warmup stays {schedule.warmup}); lr at step {step + 1}: "
            f"{self.scheduler.get_last_lr()[0]:.3g} (the checkpoint's schedule had {before:.3g})"
        )

    def _prepare_output_dir(self) -> None:
        if self.dist.is_main:
            if self.cfg.overwrite and (self.out / ckpt.CHECKPOINTS_DIR).is_dir():
                shutil.rmtree(self.out / ckpt.CHECKPOINTS_DIR)  # stale checkpoints must not be resumed later
                (self.out / LOG_FILE).unlink(missing_ok=True)
            self.out.mkdir(parents=True, exist_ok=True)
        dist.barrier(self.dist)

    # -- steps ------------------------------------------------------------------------------------------

    def _autocast(self):
        dtype = self.prepared.autocast_dtype
        return torch.autocast(self.device.type, dtype=dtype) if dtype is not None else nullcontext()

    def _train_step(self, step_rows: list[list[Example]]) -> tuple[float, float | None, int]:
        """One optimizer step over the global micro-batches `step_rows`; returns (loss, grad norm, tokens)."""
        total_loss_tokens = sum(r.num_loss_tokens for rows in step_rows for r in rows)
        mine = step_rows[self.dist.rank :: self.dist.world_size]
        scale = self.dist.world_size / total_loss_tokens  # DDP / FSDP average over processes
        loss_sum, tokens = 0.0, 0
        for i, rows in enumerate(mine):
            batch = collate(rows, self.pad_id)
            ids, labels = batch.input_ids.to(self.device), batch.labels.to(self.device)
            with dist.gradient_sync(self.wrapped, self.dist, sync=i == len(mine) - 1):
                with self._autocast():
                    loss, _ = self.wrapped(ids, labels)
                (loss * scale).backward()
            loss_sum += float(loss.detach())
            tokens += sum(len(r) for r in rows)
        grad_norm = None
        if self.cfg.max_grad_norm is not None:
            params = [p for p in self.wrapped.parameters() if p.requires_grad]
            norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)
            grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum, tokens = dist.all_reduce_sum([loss_sum, tokens], self.dist, self.device)
        return loss_sum / total_loss_tokens, grad_norm, int(tokens)

    @torch.no_grad()
    def evaluate(self) -> dict | None:
        """Mean token loss and perplexity on the held-out examples (None without any)."""
        if not self.eval_batches:
            return None
        self.wrapped.eval()
        n, world = len(self.eval_batches), self.dist.world_size
        loss_sum, count = 0.0, 0.0
        for j in range(math.ceil(n / world)):  # equal counts per process (FSDP gathers in lockstep)
            index = j * world + self.dist.rank
            batch = collate(self.eval_batches[index if index < n else 0], self.pad_id)
            with self._autocast():
                loss, tokens = self.wrapped(batch.input_ids.to(self.device), batch.labels.to(self.device))
            if index < n:
                loss_sum, count = loss_sum + float(loss), count + float(tokens)
        loss_sum, count = dist.all_reduce_sum([loss_sum, count], self.dist, self.device)
        self.wrapped.train()
        mean = loss_sum / count
        return {
            "step": self.state.step,
            "eval_loss": mean,
            "eval_perplexity": math.exp(min(mean, 50.0)),
            "eval_tokens": int(count),
        }

    # -- the run ----------------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        cfg, state = self.cfg, self.state
        self._prepare_output_dir()
        seq_len = (
            min(cfg.max_seq_len, max(len(e) for e in self.train_examples))
            if cfg.batching == "bucket"
            else cfg.max_seq_len
        )
        group = (
            qlora_group_size(self.prepared.loaded.config, cfg.qlora_group_size)
            if cfg.method == "qlora"
            else None
        )
        planned, plan_note = planned_peak(cfg, self.prepared.loaded.config, self.precision, seq_len,
                                          self.dist.world_size, self.dist.strategy, self.device, group)  # fmt: skip
        memory = StepMemory(self.device, cfg.measure_memory and not self.dist.enabled,
                            model_tensors(self.model, [t for s in self.optimizer.state.values() for t in s.values()
                                                       if isinstance(t, torch.Tensor)]))  # fmt: skip
        losses: list[float] = []
        log = open(self.out / LOG_FILE, "a") if self.dist.is_main else None  # noqa: SIM115
        show = cfg.progress and self.dist.is_main
        with TrainProgress(self.total_steps, state.step, show, cfg.log_every) as bar:
            bar.print(self._describe(planned, plan_note))
            if state.step == 0:
                self._record_eval(bar, log)
            epoch_cache: dict[int, list] = {}
            done_here = 0
            while state.step < self.total_steps:
                batches = epoch_cache.get(state.epoch)
                if batches is None:
                    epoch_cache.clear()
                    batches = epoch_cache[state.epoch] = epoch_batches(
                        self.train_examples,
                        cfg.batch_size,
                        cfg.batching,
                        cfg.max_seq_len,
                        cfg.seed,
                        state.epoch,
                    )
                k, epoch_steps = state.step_in_epoch, self._steps_in(len(batches))
                if k >= epoch_steps:  # packing can give an epoch one row less than the first
                    state.epoch, state.step_in_epoch = state.epoch + 1, 0
                    continue
                start = time.perf_counter()
                with memory.track(done_here):
                    loss, grad_norm, tokens = self._train_step(
                        batches[k * self.per_step : (k + 1) * self.per_step]
                    )
                elapsed = time.perf_counter() - start
                memory.after_step(done_here, self.optimizer)
                done_here += 1
                state.step, state.step_in_epoch, state.tokens_seen = (
                    state.step + 1,
                    k + 1,
                    state.tokens_seen + tokens,
                )
                if state.step_in_epoch == epoch_steps:
                    state.epoch, state.step_in_epoch = state.epoch + 1, 0
                lr = self.scheduler.get_last_lr()[0]
                entry = {"step": state.step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": tokens,
                         "seconds": round(elapsed, 4)}  # fmt: skip
                state.history.append(entry)
                losses.append(loss)
                if log:
                    log.write(json.dumps(entry) + "\n")
                    log.flush()
                bar.update(state.step, loss, tokens / max(elapsed, 1e-9), memory.current_bytes(), lr)
                last = state.step == self.total_steps
                if (cfg.eval_every and state.step % cfg.eval_every == 0) or last:
                    self._record_eval(bar, log)
                if (cfg.save_every and state.step % cfg.save_every == 0) or last:
                    self._save_checkpoint()
            self._save_outputs()
            rss = peak_rss_bytes()
            bar.print(f"memory: measured tensor peak {fmt_bytes(memory.peak_bytes)}, peak RSS {fmt_bytes(rss)}; "
                      f"planner predicted {fmt_bytes(planned)} ({plan_note})")  # fmt: skip
        if log:
            log.close()
        result = TrainResult(
            self.out, state, losses, state.evals, memory.peak_bytes, rss, planned, self.dist.rank
        )
        if self.dist.is_main:
            self._write_summary(result)
        return result

    def _describe(self, planned: int | None, note: str) -> str:
        p, cfg = self.prepared, self.cfg
        lines = [
            f"model {p.loaded.source} | {cfg.method} | {self.precision} | optim {cfg.optim} | "
            f"{p.trainable_parameters:,} trainable parameters (base model: {p.loaded.config.num_parameters():,})",
            f"data: {len(self.train_examples)} train / {len(self.eval_examples)} eval examples "
            f"({self.data_stats['truncated']} truncated, {self.data_stats['dropped']} dropped); "
            f"{self.steps_per_epoch} steps/epoch, {self.total_steps} steps, "
            f"{self.dist.world_size} process(es) x {cfg.grad_accum} accumulation x batch {cfg.batch_size}",
            f"memory: planner predicts a peak of {fmt_bytes(planned)} per device ({note})",
        ]
        if self.resume_from is not None:
            lines.append(f"resumed from {self.resume_from} at step {self.state.step}")
            if getattr(self, "schedule_note", None):
                lines.append(self.schedule_note)
        return "\n".join(lines)

    def _record_eval(self, bar: TrainProgress, log) -> None:
        result = self.evaluate()
        if result is None:
            return
        self.state.evals.append(result)
        bar.print(
            f"eval @ step {result['step']}: loss {result['eval_loss']:.4f}, perplexity {result['eval_perplexity']:.2f}"
        )
        if log:
            log.write(json.dumps(result) + "\n")
            log.flush()

    def _save_checkpoint(self) -> None:
        final = ckpt.checkpoint_path(self.out, self.state.step)
        tmp = ckpt.temporary_path(final)
        if self.dist.is_main:
            ckpt.begin_save(final)
        dist.barrier(self.dist)
        ckpt.save_rng(tmp, self.dist.rank)
        trainable = dist.full_trainable_state(self.wrapped, self.model, self.dist)
        optimizer_state = None
        if not shards.uses_shards(self.optimizer):
            optimizer_state = dist.full_optimizer_state(self.wrapped, self.optimizer, self.dist)
        elif self.dist.strategy == "fsdp":  # every rank holds its own shard of the states
            shards.save_shard(tmp, self.optimizer, self.model, self.dist.rank, self.dist.world_size)
        elif self.dist.is_main:  # DDP / one process: the states are whole on every rank
            shards.save_shard(tmp, self.optimizer, self.model, 0, 1)
        dist.barrier(self.dist)
        if self.dist.is_main:
            ckpt.finish_save(
                tmp,
                final,
                trainable,
                optimizer_state,
                self.scheduler.state_dict(),
                self.state,
                self.fingerprint,
            )
            ckpt.prune_checkpoints(self.out, self.cfg.keep_checkpoints)
        dist.barrier(self.dist)

    def _save_outputs(self) -> None:
        """LoRA: a PEFT adapter in the output dir. Full: an HF checkpoint directory there."""
        from slimlm.train.merge import save_hf_checkpoint
        from slimlm.train.peft_format import save_peft_adapter

        trainable = dist.full_trainable_state(self.wrapped, self.model, self.dist)
        if self.dist.is_main:
            p = self.prepared
            if p.lora is not None:
                save_peft_adapter(
                    self.model, p.lora, self.out, str(p.loaded.source), p.base_quantization, trainable
                )
            else:
                save_hf_checkpoint(p.loaded, self.model, self.out, state=trainable)
        dist.barrier(self.dist)

    def _write_summary(self, result: TrainResult) -> None:
        summary = {
            "config": self.cfg.to_dict(),
            "precision": self.precision,
            "device": str(self.device),
            "world_size": self.dist.world_size,
            "trainable_parameters": self.prepared.trainable_parameters,
            "steps": result.state.step,
            "final_loss": result.losses[-1] if result.losses else None,
            "evals": result.evals,
            "memory": {"measured_tensor_peak_bytes": result.measured_peak_bytes,
                       "peak_rss_bytes": result.peak_rss_bytes, "planned_peak_bytes": result.planned_peak_bytes},
        }  # fmt: skip
        (self.out / SUMMARY_FILE).write_text(json.dumps(summary, indent=1))

    def close(self) -> None:
        dist.shutdown(self.dist)


def train(cfg: TrainConfig, loaded=None) -> TrainResult:
    """Run a whole training job (see TrainConfig); returns losses, evals and memory numbers."""
    trainer = Trainer(cfg, loaded)
    try:
        return trainer.run()
    finally:
        trainer.close()


__all__ = ["TrainResult", "Trainer", "train"]
