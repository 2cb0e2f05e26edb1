"""A faster LM head loss for causal-LM training on CPU, behind trl's own `fused_lm_head=True` interface.

Why: trl 1.16's SFTTrainer computes the loss through a chunked log-prob kernel. Where Triton runs (CUDA, XPU) it
scores only the labelled positions; on CPU its torch fallback scores *every* position (padding and prompt tokens
included) and does the softmax statistics and the backward GEMMs in fp32. Profiled on SmolLM2-135M (8 x 512, 2-core
AMX CPU) that head took half of each training step. Here only positions with a label are scored, the vocabulary
projection runs in the autocast dtype (bf16 on AMX), and the [tokens, vocab] logits exist one token chunk at a time
(recomputed in backward, so memory stays bounded like trl's).

`install(model)` wraps the forward trl patched onto the model; anything this path does not cover (a GPU, MoE router
losses, logit soft-capping or scaling, pre-shifted labels, a temperature) falls through to trl's own forward.
"""

from __future__ import annotations

import functools
import types

from .. import upstream

TOKEN_CHUNK = 1024  # tokens per [chunk, vocab] logits tile: 1024 x 49k fp32 is ~200 MB


def _compute_dtype(hidden):
    import torch

    return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else hidden.dtype


def _make_function():
    import torch

    class ChunkLogProb(torch.autograd.Function):
        """log p(target), entropy, is-top-1 and the mean logit (trl's DPO logs it) for one chunk of tokens; logits are
        recomputed in backward."""

        @staticmethod
        def forward(ctx, hidden, weight, bias, targets, dtype):
            logits = _logits(hidden, weight, bias, dtype)
            lse = torch.logsumexp(logits, dim=-1)
            target_logit = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            with torch.no_grad():
                p = torch.exp(logits - lse.unsqueeze(-1))
                entropy = lse - (p * logits).sum(-1)
                is_top1 = logits.argmax(-1) == targets  # argmax takes the first maximum, like trl's metric
                mean_logits = logits.mean(-1)
            ctx.save_for_backward(hidden, weight, bias, targets, lse)
            ctx.dtype = dtype
            ctx.mark_non_differentiable(entropy, is_top1, mean_logits)
            return target_logit - lse, entropy, is_top1, mean_logits

        @staticmethod
        def backward(ctx, grad_lp, _grad_entropy, _grad_top1, _grad_mean):
            hidden, weight, bias, targets, lse = ctx.saved_tensors
            dtype = ctx.dtype
            with torch.no_grad():
                logits = _logits(hidden, weight, bias, dtype)
                # d log p_t / d z_j = 1[j = t] - p_j, scaled by the incoming gradient of each token
                grad = torch.exp(logits.sub_(lse.unsqueeze(-1))).mul_(-grad_lp.unsqueeze(-1))
                grad.scatter_add_(-1, targets.unsqueeze(-1), grad_lp.unsqueeze(-1).to(grad.dtype))
                g = grad.to(dtype)
                gh = (g @ weight.to(dtype)).to(hidden.dtype) if ctx.needs_input_grad[0] else None
                gw = (g.t() @ hidden.to(dtype)).to(weight.dtype) if ctx.needs_input_grad[1] else None
                gb = grad.sum(0).to(bias.dtype) if bias is not None and ctx.needs_input_grad[2] else None
            return gh, gw, gb, None, None

    def _logits(hidden, weight, bias, dtype):
        z = hidden.to(dtype) @ weight.to(dtype).t()
        if bias is not None:
            z = z + bias.to(dtype)
        return z.float()

    return ChunkLogProb


@functools.lru_cache(maxsize=1)
def _function():
    return _make_function()


def score_tokens(hidden, weight, bias, targets, chunk: int = TOKEN_CHUNK):
    """Per-token (log_prob, entropy, is_top1, mean_logit) of `targets` under softmax(hidden @ weight.T + bias), chunk by
    chunk."""
    import torch

    fn, dtype = _function(), _compute_dtype(hidden)
    parts = [fn.apply(hidden[s:s + chunk], weight, bias, targets[s:s + chunk], dtype) for s in range(0, hidden.shape[0], chunk)]
    if not parts:
        empty = hidden.new_zeros(0, dtype=torch.float32) + hidden.sum() * 0  # keeps the graph connected
        return empty, empty.detach(), torch.zeros(0, dtype=torch.bool, device=hidden.device), empty.detach()
    return tuple(torch.cat(x) for x in zip(*parts))


def covers(model) -> bool:
    """Whether this head computes what trl's would for `model` (else trl's forward runs)."""
    cfg = model.config.get_text_config()
    return not any(getattr(cfg, k, None) for k in ("final_logit_softcapping", "logit_scale", "output_multiplier",
                                                   "lm_head_multiplier", "logits_scaling", "output_router_logits"))


def _relies_on():
    """trl's fused LM-head output (the fields its loss and metrics read) and the forward keywords trl passes."""
    import dataclasses

    from trl.trainer import utils

    fields = {f.name for f in dataclasses.fields(utils.FusedCausalLMOutput)}
    need = {"loss", "log_probs", "entropy", "is_top1", "mean_logits", "label_mask"}
    return None if need <= fields else f"trl's FusedCausalLMOutput has no {', '.join(sorted(need - fields))}"


upstream.register(upstream.Patch("cpu_lm_head", "trl", "labelled-positions-only LM-head loss on CPU", _relies_on))


def _sharded(param) -> bool:
    """An FSDP2 shard (a DTensor) or a ZeRO-3 partitioned parameter (DeepSpeed tags those with ds_id)."""
    from torch.distributed.tensor import DTensor

    return isinstance(param, DTensor) or hasattr(param, "ds_id")


def install(model) -> bool:
    """Wrap `model.forward` (already patched by trl's add_fused_lm_head) so CPU fused calls take the path above."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not covers(base) or "forward" not in vars(base):  # trl sets the fused forward on the instance
        return False
    if not upstream.usable("cpu_lm_head"):
        return False
    trl_forward = base.forward

    @functools.wraps(trl_forward)
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        head = self.get_output_embeddings()
        # A sharded weight (FSDP, ZeRO-3) is gathered only around a call of the head module: trl's path runs then.
        if not fused_lm_head or shift_labels is not None or head.weight.device.type != "cpu" or _sharded(head.weight):
            return trl_forward(*args, fused_lm_head=fused_lm_head, labels=labels, shift_labels=shift_labels,
                               num_items_in_batch=num_items_in_batch, **kwargs)
        from trl.trainer.utils import FusedCausalLMOutput

        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state[:, :-1]
        labels = labels[:, 1:]
        mask = labels != -100
        scored = score_tokens(hidden[mask], head.weight, head.bias, labels[mask])
        log_probs, entropy, is_top1, mean_logits = (x.new_zeros(mask.shape).masked_scatter(mask, x) for x in scored)  # 0 where unlabelled
        loss = -log_probs.sum() / (mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
        return FusedCausalLMOutput(loss=loss, log_probs=log_probs, entropy=entropy, is_top1=is_top1, mean_logits=mean_logits,
                                   label_mask=mask)

    base.forward = types.MethodType(forward, base)
    return True
