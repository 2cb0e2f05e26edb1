"""The CPU LM head loss (lora_ft.cpu.lm_head) computes what trl's fused head and a plain log_softmax compute."""

import pytest
import torch

from lora_ft.cpu import lm_head as cpu_lm_head


def _reference(hidden, weight, bias, targets):
    logits = hidden @ weight.t() + (bias if bias is not None else 0)
    logp = torch.log_softmax(logits.float(), -1)
    p = logp.exp()
    return logp.gather(-1, targets[:, None])[:, 0], -(p * logp).sum(-1), logits.argmax(-1) == targets


@pytest.mark.parametrize("with_bias", [False, True])
def test_score_tokens_matches_log_softmax_and_its_gradients(with_bias):
    torch.manual_seed(0)
    hidden = torch.randn(11, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    bias = torch.randn(50, requires_grad=True) if with_bias else None
    targets = torch.randint(0, 50, (11,))
    lp, ent, top1, mean = cpu_lm_head.score_tokens(hidden, weight, bias, targets, chunk=4)  # 3 chunks, the last short
    rlp, rent, rtop1 = _reference(hidden, weight, bias, targets)
    z = hidden @ weight.t() + (bias if with_bias else 0)
    torch.testing.assert_close(mean, z.mean(-1).detach(), atol=1e-5, rtol=1e-5)  # trl's DPO logs it
    torch.testing.assert_close(lp, rlp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, rent.detach(), atol=1e-5, rtol=1e-5)
    assert torch.equal(top1, rtop1)
    weights = torch.randn(11)
    params = [hidden, weight] + ([bias] if with_bias else [])
    ours = torch.autograd.grad((lp * weights).sum(), params)
    ref = torch.autograd.grad((rlp * weights).sum(), params)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_no_labelled_token_gives_a_differentiable_zero():
    hidden = torch.randn(0, 8, requires_grad=True)
    lp, _, _, _ = cpu_lm_head.score_tokens(hidden, torch.randn(20, 8), None, torch.zeros(0, dtype=torch.long))
    assert lp.shape == (0,) and lp.requires_grad


def _tiny_lora_lm():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg)
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))  # what DPOTrainer does
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    return model


def _fused(model, batch):
    model.zero_grad()
    out = model(**batch, fused_lm_head=True)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out, grads


@pytest.mark.parametrize("autocast", [False, True])
def test_installed_head_matches_trl_fused_head(autocast):
    model = _tiny_lora_lm()
    ids = torch.randint(0, 300, (3, 20))
    labels = ids.clone()
    labels[:, :8] = -100  # prompt tokens
    labels[2, 12:] = -100  # padding
    attention = torch.ones_like(ids)
    attention[2, 12:] = 0
    batch = {"input_ids": ids, "attention_mask": attention, "labels": labels}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        trl_out, trl_grads = _fused(model, batch)
        assert cpu_lm_head.install(model)
        ours, our_grads = _fused(model, batch)
    tol = {"atol": 2e-2, "rtol": 2e-2} if autocast else {"atol": 1e-5, "rtol": 1e-4}
    assert torch.equal(ours.label_mask, trl_out.label_mask)
    torch.testing.assert_close(ours.loss, trl_out.loss, **tol)
    torch.testing.assert_close(ours.log_probs, trl_out.log_probs, **tol)
    torch.testing.assert_close(ours.entropy, trl_out.entropy, **tol)
    torch.testing.assert_close(ours.mean_logits, trl_out.mean_logits, **tol)
    if not autocast:
        assert torch.equal(ours.is_top1, trl_out.is_top1)
    assert our_grads.keys() == trl_grads.keys()
    for name in trl_grads:
        torch.testing.assert_close(our_grads[name], trl_grads[name], atol=5e-2 if autocast else 1e-5, rtol=5e-2 if autocast else 1e-3)
    # Generation (no fused_lm_head) still goes through the model's own forward: logits, not log-probs
    assert model(input_ids=ids[:1]).logits.shape == (1, 20, 300)


def test_not_installed_where_trl_head_does_more():
    model = _tiny_lora_lm()
    model.get_base_model().config.final_logit_softcapping = 30.0  # gemma-style: trl's head handles it, ours does not
    assert not cpu_lm_head.install(model)
