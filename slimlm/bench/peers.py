"""One runner per system, each answering the same three questions.

ttft(prompt)             seconds to the first generated token (batch 1)
decode_rate(prompt, n)   tokens/s of batch-1 decoding after the first token
throughput(prompts, n)   generated tokens/s for all prompts together (each system's best batching)
"""

from __future__ import annotations

import time

import torch


class SlimlmRunner:
    name = "slimlm"

    def __init__(self, llm, batch_llm=None) -> None:
        """`batch_llm`: the engine for `throughput`, when it is laid out for batches (default: `llm`)."""
        self.llm = llm
        self.batch_llm = batch_llm or llm

    def _params(self, n: int):
        from slimlm.engine.params import SamplingParams

        return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)

    def first_and_rate(self, prompt: list[int], n: int) -> tuple[float, float]:
        self.llm.engine.block_manager.reset_prefix_cache()  # measure real prefill, not a cache hit
        start = time.perf_counter()
        times = [time.perf_counter() - start for _ in self.llm.stream(prompt, self._params(n))]
        return times[0], (len(times) - 1) / (times[-1] - times[0])

    def throughput(self, prompts: list[list[int]], n: int) -> float:
        self.batch_llm.engine.block_manager.reset_prefix_cache()
        start = time.perf_counter()
        outs = self.batch_llm.generate(prompts, self._params(n))
        return sum(len(o.token_ids) for o in outs) / (time.perf_counter() - start)


class TransformersRunner:
    name = "transformers"

    def __init__(self, model_path, dtype: torch.dtype) -> None:
        from transformers import AutoModelForCausalLM

        path = str(model_path)
        if path.endswith(".gguf"):
            extra = {}
            try:  # transformers >= 5 keeps GGUF blocks packed (fp32 kernels) unless told to dequantize;
                # the comparison is dense model against dense model in the same dtype.
                from transformers import GgufConfig

                extra["quantization_config"] = GgufConfig(gguf_file=model_path.name, dequantize=True)
            except ImportError:
                pass
            self.model = AutoModelForCausalLM.from_pretrained(
                str(model_path.parent), gguf_file=model_path.name, dtype=dtype, **extra
            )
        else:
            self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        self.model.eval()

    def _generate(self, ids: torch.Tensor, n: int):
        with torch.inference_mode():
            return self.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
            )

    def first_and_rate(self, prompt: list[int], n: int) -> tuple[float, float]:
        ids = torch.tensor([prompt])
        start = time.perf_counter()
        self._generate(ids, 1)
        first = time.perf_counter() - start
        start = time.perf_counter()
        self._generate(ids, n)
        total = time.perf_counter() - start
        return first, (n - 1) / max(total - first, 1e-9)

    def throughput(self, prompts: list[list[int]], n: int) -> float:
        ids = torch.tensor(prompts)  # equal lengths: no padding needed
        start = time.perf_counter()
        self._generate(ids, n)
        return len(prompts) * n / (time.perf_counter() - start)


class LlamaCppRunner:
    """llama-cpp-python on the same GGUF. Its Python API runs one sequence at a time, so its
    'throughput' is its batch-1 rate over the requests one after another."""

    name = "llama.cpp"

    def __init__(self, gguf_path, threads: int, n_ctx: int = 1024) -> None:
        from llama_cpp import Llama

        self.llm = Llama(
            model_path=str(gguf_path),
            n_threads=threads,
            n_threads_batch=threads,
            n_ctx=n_ctx,
            verbose=False,
            logits_all=False,
        )

    def first_and_rate(self, prompt: list[int], n: int) -> tuple[float, float]:
        self.llm.reset()
        start = time.perf_counter()
        times = []
        for _ in self.llm.generate(prompt, temp=0.0, reset=True):
            times.append(time.perf_counter() - start)
            if len(times) >= n:
                break
        return times[0], (len(times) - 1) / (times[-1] - times[0])

    def throughput(self, prompts: list[list[int]], n: int) -> float:
        start = time.perf_counter()
        total = 0
        for prompt in prompts:
            self.llm.reset()
            for _ in self.llm.generate(prompt, temp=0.0, reset=True):
                total += 1
                if total % n == 0:
                    break
        return total / (time.perf_counter() - start)
