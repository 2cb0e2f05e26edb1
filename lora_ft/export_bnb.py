"""`lora-ft export MODEL_DIR --format bnb4`: a bitsandbytes 4-bit (NF4) serialized folder, loaded back and checked.

The check compares the reloaded 4-bit model with the full-precision one on sample inputs: label agreement for
classifiers, greedy next-token agreement for generators. 4-bit is lossy, so it reports rather than demands equality,
and refuses only a folder that does not reload or loses the classifier head.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

from .errors import LoraFtError
from .outputs import check_output, output_dir
from .runs import write_json
from .trust import NONE, Trust

MIN_AGREEMENT = 0.5  # below this the 4-bit model is not the same model any more: refuse


def export_bnb4(model_dir: str, output: str, inputs: Optional[list[str]] = None, overwrite: bool = False,
                trust: Trust = NONE) -> dict:
    import torch

    from .compress import _nf4, _weights_mb
    from .export_onnx import REPORT_FILE, SAMPLE_TEXTS
    from .inference import load_run, render_prompt
    from .tasks.classification import render_texts

    src = Path(model_dir)
    if not (src / "config.json").is_file():
        raise LoraFtError(f"export: {model_dir} is not a merged model folder (no config.json); run `lora-ft merge` first")
    check_output(Path(output), REPORT_FILE, sources=[src], overwrite=overwrite, what="export: --output")
    model, tok, recipe = load_run(src, trust)
    texts = inputs or SAMPLE_TEXTS
    with output_dir(output, REPORT_FILE, sources=[src], overwrite=overwrite, what="export: --output") as tmp:
        _nf4(src, recipe, tmp)
        tok.save_pretrained(tmp)
        for name in ("lora_ft_recipe.yaml", "generation_config.json", "merge_report.json"):
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
        reloaded, _, _ = load_run(tmp, trust)  # exactly what a user gets from the folder
        quantized = sum(1 for m in reloaded.modules() if type(m).__name__ == "Linear4bit")
        with torch.no_grad():
            if recipe.args.task == "sequence-classification":
                enc = tok(render_texts(texts, recipe.args), padding=True, truncation=True, max_length=recipe.args.max_length, return_tensors="pt")
                a, b = model(**enc).logits.float(), reloaded(**enc).logits.float()
                agree = float((a.argmax(-1) == b.argmax(-1)).float().mean())
                check = {"label_agreement": agree, "max_abs_prob_diff": float((a.softmax(-1) - b.softmax(-1)).abs().max())}
            else:
                same = total = 0
                for t in texts:
                    ids = (tok(t, return_tensors="pt")["input_ids"] if getattr(model.config, "is_encoder_decoder", False)
                           else torch.tensor([render_prompt(tok, t, bool(recipe.args.use_chat_template))]))
                    kw = dict(max_new_tokens=16, do_sample=False)
                    x = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)[0].tolist()
                    y = reloaded.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)[0].tolist()
                    n = min(len(x), len(y))
                    same += sum(int(p == q) for p, q in zip(x[:n], y[:n]))
                    total += max(len(x), len(y))
                agree = same / max(total, 1)
                check = {"greedy_token_agreement": agree}
        report = {"source": str(src), "format": "bnb4", "quant_type": "nf4", "linear4bit_layers": quantized,
                  "size_mb": round(_weights_mb(tmp), 2), "original_size_mb": round(_weights_mb(src), 2), "n_inputs": len(texts), **check,
                  "verified": quantized > 0 and agree >= MIN_AGREEMENT}
        if not report["verified"]:
            raise LoraFtError(f"export --format bnb4: the reloaded 4-bit model disagrees with the original ({check}); nothing written")
        write_json(tmp / REPORT_FILE, report)
    return report

