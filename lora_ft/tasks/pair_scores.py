"""Log-probs of preference completions under a model, and the pair metrics built from them (one definition for
every preference method, so the methods' figures compare)."""

from __future__ import annotations

from typing import Optional

MAX_SCORE_BATCH = 8  # sequences per forward: the logits are batch x length x vocab floats


def score_pairs(model, tok, rows: list, batch_size: int, bf16: bool) -> list[dict]:
    """{"logps": [summed log-prob of each completion], "tokens": [its length], "label"} per encoded row
    (`preference.encode_pair` ids), completion tokens only, each sequence unpadded in effect (right padding)."""
    import torch

    seqs = [(i, j, r["prompt_ids"], c) for i, r in enumerate(rows) for j, c in enumerate(r["completions"])]
    order = sorted(range(len(seqs)), key=lambda k: len(seqs[k][2]) + len(seqs[k][3]))
    logps = [[0.0] * len(r["completions"]) for r in rows]
    device = next(model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    was_training = model.training
    model.eval()
    bs = max(1, min(int(batch_size), MAX_SCORE_BATCH))
    try:
        for s in range(0, len(order), bs):
            batch = [seqs[k] for k in order[s:s + bs]]
            width = max(len(p) + len(c) for _, _, p, c in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            target = torch.zeros_like(ids, dtype=torch.bool)
            for b, (_, _, p, c) in enumerate(batch):
                ids[b, :len(p) + len(c)] = torch.tensor(p + c)
                mask[b, :len(p) + len(c)] = 1
                target[b, len(p):len(p) + len(c)] = True
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
            lp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, ids[:, 1:, None].to(device))[..., 0]
            per_seq = (lp * target[:, 1:].to(device)).sum(-1).tolist()
            for (i, j, _, _), v in zip(batch, per_seq):
                logps[i][j] = v
    finally:
        if was_training:
            model.train()
    return [{"logps": lp, "tokens": [len(c) for c in r["completions"]], "label": r.get("label")} for lp, r in zip(logps, rows)]


def _mean(xs: list) -> float:
    return float(sum(xs) / len(xs)) if xs else float("nan")


def rewards(now: dict, ref: Optional[dict], beta: float, ref_free: bool) -> list[float]:
    """Implicit rewards: beta x (log-prob - reference log-prob) (DPO, IPO, KTO), or beta x mean token log-prob for the
    reference-free methods (ORPO, SimPO), as trl's trainers log them."""
    if ref_free:
        return [beta * lp / max(n, 1) for lp, n in zip(now["logps"], now["tokens"])]
    return [beta * (lp - r) for lp, r in zip(now["logps"], ref["logps"])]


def pair_metrics(now: list, ref: Optional[list], beta: float, ref_free: bool) -> dict:
    """reward_accuracy (chosen's reward above rejected's), reward_margin, logps_chosen / logps_rejected (means of the
    summed completion log-probs), logp_accuracy (chosen more likely than rejected) and logp_margin. Unpaired rows
    (KTO data): accuracy is the share of rewards whose sign matches the label."""
    ref = ref or [None] * len(now)
    paired = [(n, r) for n, r in zip(now, ref) if n["label"] is None]
    out = {}
    if paired:
        rw = [rewards(n, r, beta, ref_free) for n, r in paired]
        c, r = [n["logps"][0] for n, _ in paired], [n["logps"][1] for n, _ in paired]
        out.update(reward_accuracy=_mean([float(a > b) for a, b in rw]), reward_margin=_mean([a - b for a, b in rw]),
                   logps_chosen=_mean(c), logps_rejected=_mean(r),
                   logp_accuracy=_mean([float(a > b) for a, b in zip(c, r)]), logp_margin=_mean([a - b for a, b in zip(c, r)]))
    else:
        rw = [rewards(n, r, beta, ref_free)[0] for n, r in zip(now, ref)]
        good = [(x, n) for x, n in zip(rw, now) if n["label"]]
        bad = [(x, n) for x, n in zip(rw, now) if not n["label"]]
        out.update(reward_accuracy=_mean([float((x > 0) == bool(n["label"])) for x, n in zip(rw, now)]),
                   reward_margin=_mean([x for x, _ in good]) - _mean([x for x, _ in bad]),
                   logps_chosen=_mean([n["logps"][0] for _, n in good]), logps_rejected=_mean([n["logps"][0] for _, n in bad]))
    return {k: round(v, 6) for k, v in out.items()}
