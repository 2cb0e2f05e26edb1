"""The naive deployment benchmarks/serve_load.py sets beside `lora-ft serve`: FastAPI calling the peft model one
request at a time, in fp32.

    python benchmarks/naive_serve.py RUN_DIR --port 8001

peft's own forward (its DoRA recomputes the weight norm at every forward), no batching, no_grad, torch's default
threads; each request blocks the event loop, so requests run one at a time. Inputs are encoded as training encoded
them (the task's encode), so its labels can be set beside `lora-ft predict`'s.
"""

from __future__ import annotations

import argparse


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run")
    p.add_argument("--port", type=int, default=8001)
    args = p.parse_args()
    import torch
    import uvicorn
    from fastapi import FastAPI
    from peft import PeftModel
    from transformers import AutoTokenizer

    from lora_ft.config import load_run_recipe
    from lora_ft.modeling import fix_pad_token, load_model
    from lora_ft.tasks import auto_class, get_task

    recipe = load_run_recipe(args.run)
    a, task = recipe.args, get_task(recipe.args.task)
    tok = AutoTokenizer.from_pretrained(args.run)
    fix_pad_token(tok)
    base, _ = load_model(a, auto_class(task), training=False, **task.reload_kwargs(a))  # loading only: fp32 weights
    task.setup_model(base, tok)
    model = PeftModel.from_pretrained(base, args.run).eval()
    app = FastAPI()

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.post("/v1/classify")
    async def classify(body: dict):
        texts = [body["inputs"]] if isinstance(body["inputs"], str) else body["inputs"]
        with torch.no_grad():
            probs = model(**task.encode(tok, texts, a)).logits.softmax(-1)
        return {"results": [{"label": a.labels[int(row.argmax())], "score": float(row.max())} for row in probs]}

    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
