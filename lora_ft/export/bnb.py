"""`lora-ft export MODEL_DIR --format bnb4`: a bitsandbytes 4-bit (NF4) serialized folder, loaded back and checked.

The check compares the reloaded 4-bit model with the full-precision one on sample inputs: label agreement for
classifiers, greedy next-token agreement for generators. 4-bit is lossy, so it reports rather than demands equality,
and refuses only a folder that does not reload or loses the classifier head.
"""

from __future__ import annotations

import shutil
from typing import Optional

from ..errors import LoraFtError
from ..outputs import output_dir
from ..runs import write_json
from ..trust import NONE, Trust

MIN_AGREEMENT = 0.5  # below this the 4-bit model is not the same model any more: refuse


def export_bnb4(model_dir: str, output: str, inputs: Optional[list[str]] = None, overwrite: bool = False,
                trust: Trust = NONE) -> dict:
    from ..compress import _nf4, _weights_mb
    from ..inference import load_run
    from .onnx import REPORT_FILE, SAMPLE_TEXTS, load_merged
    from ..tasks import get_task

    src, model, tok, recipe = load_merged(model_dir, output, overwrite, trust)
    texts = inputs or SAMPLE_TEXTS
    with output_dir(output, REPORT_FILE, sources=[src], overwrite=overwrite, what="export: --output") as tmp:
        _nf4(src, recipe, tmp)
        tok.save_pretrained(tmp)
        for name in ("lora_ft_recipe.yaml", "generation_config.json", "merge_report.json"):
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
        reloaded, _, _ = load_run(tmp, trust)  # exactly what a user gets from the folder
        quantized = sum(1 for m in reloaded.modules() if type(m).__name__ == "Linear4bit")
        check, agree = get_task(recipe.args.task).export_check(model, reloaded, tok, texts, recipe.args)
        report = {"source": str(src), "format": "bnb4", "quant_type": "nf4", "linear4bit_layers": quantized,
                  "size_mb": round(_weights_mb(tmp), 2), "original_size_mb": round(_weights_mb(src), 2), "n_inputs": len(texts), **check,
                  "verified": quantized > 0 and agree >= MIN_AGREEMENT}
        if not report["verified"]:
            raise LoraFtError(f"export --format bnb4: the reloaded 4-bit model disagrees with the original ({check}); nothing written")
        write_json(tmp / REPORT_FILE, report)
    return report

