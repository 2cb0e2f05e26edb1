"""One generation request in the model thread: it stops when its client is gone and samples from its own generator.

`generate` runs in a worker thread that asyncio cannot cancel. Without a check at each step, a timed-out or
abandoned request kept decoding up to max_new_tokens while holding its base's lock, and the requests queued behind
it timed out in turn.
"""

from __future__ import annotations

import threading
from typing import Optional

import torch
from transformers import LogitsProcessor, StoppingCriteria
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper


class Job:
    """`cancel()` from the event loop (timeout, client gone); the worker sees it at its next decoding step.

    No deadline of its own: a job that stopped itself at the timeout would answer a truncated 200 instead of the 504.
    """

    def __init__(self):
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def over(self) -> bool:
        return self._cancelled.is_set()


class JobOver(Exception):
    """The job was cancelled before its turn in the model thread came."""


class StopWhenOver(StoppingCriteria):
    def __init__(self, job: Job):
        self.job = job

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.job.over, dtype=torch.bool, device=input_ids.device)


class SeededSampler(LogitsProcessor):
    """Draws the next token from this request's torch.Generator; generate then runs greedy and picks it.

    transformers' sampling calls torch.multinomial on the process RNG, which the server used to reseed per request:
    concurrent requests on other bases then shared (and reset) one stream. Here the draw never touches it.
    The warpers are the ones `generate(do_sample=True)` would add from the model's generation config.
    """

    def __init__(self, temperature: float, seed: Optional[int], generation_config=None):
        self.seed = seed
        self.generator: Optional[torch.Generator] = None
        # Unset fields get transformers' own defaults at generate time (top_k 50, top_p 1.0); so here.
        top_k = getattr(generation_config, "top_k", None)
        top_k = 50 if top_k is None else top_k
        top_p = getattr(generation_config, "top_p", None)
        self.warpers = [TemperatureLogitsWarper(temperature)]
        if top_k:
            self.warpers.append(TopKLogitsWarper(top_k=top_k))
        if top_p is not None and top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p=top_p))

    def __call__(self, input_ids, scores):
        if self.generator is None:
            self.generator = torch.Generator(device=scores.device)
            self.generator.manual_seed(self.seed) if self.seed is not None else self.generator.seed()
        for w in self.warpers:
            scores = w(input_ids, scores)
        probs = torch.softmax(scores.float(), dim=-1)
        picked = torch.multinomial(probs, num_samples=1, generator=self.generator)
        return torch.full_like(scores, float("-inf")).scatter_(1, picked, 0.0)


def position_limit(model) -> Optional[int]:
    """How many positions a decoder-only model has; None for encoder-decoders (sources are cut at max_length)."""
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "is_encoder_decoder", False):
        return None
    return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
