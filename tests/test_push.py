"""`lora-ft push`: staging (what is uploaded), the model card, the token, and the upload against a local fake Hub.

The Hub is unreachable here, so the upload path runs against `FakeHub`: a threaded http.server on 127.0.0.1 that
answers the calls huggingface_hub makes for create_repo + create_branch + upload_folder (repo create, branch
create, README metadata validation, preupload, git-LFS batch + PUT + verify, NDJSON commit) and records them.
Not faked: the Xet storage protocol (hf_xet's CAS uploads). The default (xet) pipeline is exercised with every
file committed inline ("regular" upload mode), and the LFS path with xet switched off.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from lora_ft.cli import main
from lora_ft.config import RECIPE_FILE, resolve, save_recipe
from lora_ft.errors import LoraFtError
from lora_ft.hub import hub_id_of, stage

TOKEN = "hf_" + "Zq7" * 12  # shaped like a real token, so lora_ft.security's pattern would also catch it
LABELS = ["negative", "neutral", "positive"]
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256))  # binary content is all an upload sees
ADAPTER_FILES = ["README.md", "adapter_config.json", "adapter_model.safetensors", "chat_template.jinja",
                 "confusion_matrix.png", "lora_ft_recipe.yaml", "loss_curve.png", "metrics.json",
                 "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
METRICS = {"train_runtime": 12.5, "train_samples_per_second": 40.2, "train_tokens_per_second": 812.0,
           "train_loss": 0.41, "train_examples": 120, "global_step": 8, "world_size": 1, "eval_loss": 0.52,
           "eval_accuracy": 0.8, "eval_macro_f1": 0.78, "eval_accuracy_before": 0.33, "eval_samples": 40,
           "eval_runtime": 0.5, "peak_memory_mb": 321.5,
           "eval_per_class": {n: {"precision": 0.8, "recall": 0.8, "f1": 0.8, "support": 13} for n in LABELS}}


# ---------------------------------------------------------------- a run dir, written by hand


def _safetensors(path: Path, **tensors) -> Path:
    import numpy as np
    from safetensors.numpy import save_file

    save_file({k: np.asarray(v, dtype=np.float32) for k, v in tensors.items()} or {"w": np.zeros((2, 2), np.float32)}, str(path))
    return path


def _recipe(run: Path, **keys) -> None:
    raw = {"model_name_or_path": "builtin:minilm-l6", "task": "sequence-classification",
           "dataset_name": "mteb/tweet_sentiment_extraction", "labels": LABELS, "max_length": 64,
           "learning_rate": 1e-3, "num_train_epochs": 2, "output_dir": str(run), **keys}
    save_recipe(resolve(raw, source="recipe.yaml"), run)


def make_run(root: Path, name: str = "run", **recipe) -> Path:
    """What `lora-ft train` leaves behind, plus the clutter a push must never upload."""
    run = root / name
    run.mkdir(parents=True)
    (run / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "SEQ_CLS", "r": 4, "lora_alpha": 8, "target_modules": ["query", "value"],
        "modules_to_save": ["classifier"], "base_model_name_or_path": "/home/me/.venv/site-packages/minilm/model"}))
    _safetensors(run / "adapter_model.safetensors")
    (run / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "WordLevel"}}')
    (run / "tokenizer_config.json").write_text('{"tokenizer_class": "PreTrainedTokenizerFast"}')
    (run / "special_tokens_map.json").write_text('{"pad_token": "[PAD]"}')
    (run / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    _recipe(run, **recipe)
    (run / "metrics.json").write_text(json.dumps(METRICS))
    (run / "loss_curve.png").write_bytes(PNG)
    (run / "confusion_matrix.png").write_bytes(PNG[::-1])
    # never uploaded:
    (run / "README.md").write_text("---\nbase_model: /home/me/model\n---\n# Model Card for Model ID\n")
    (run / "eval_predictions.jsonl").write_text('{"text": "private eval text", "label": "neutral"}\n')
    (run / "log_history.json").write_text("[]")
    (run / "confusion_matrix.json").write_text("{}")
    (run / "training_args.bin").write_bytes(b"\x80\x04pickle")
    (run / "stray.pkl").write_bytes(b"\x80\x04pickle")
    ck = run / "checkpoint-8"
    ck.mkdir()
    (ck / "optimizer.pt").write_bytes(b"\x80\x04pickle")
    _safetensors(ck / "adapter_model.safetensors")
    (run / "runs" / "Nov22_host").mkdir(parents=True)
    (run / "runs" / "Nov22_host" / "events.out.tfevents.1.host").write_bytes(b"tb")
    return run


def make_merged(root: Path, run: Path) -> Path:
    """What `lora-ft merge RUN --output DIR` writes: a plain model, the run's recipe (byte copy), merge_report.json."""
    out = root / "merged"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"architectures": ["BertForSequenceClassification"], "model_type": "bert",
                                                 "id2label": dict(enumerate(LABELS))}))
    _safetensors(out / "model.safetensors")
    for name in ("tokenizer.json", "tokenizer_config.json", RECIPE_FILE):
        (out / name).write_bytes((run / name).read_bytes())
    (out / "merge_report.json").write_text(json.dumps({
        "run_dir": str(run), "output": str(out), "dtype": "float32", "task": "sequence-classification", "n_inputs": 40,
        "base_model": "builtin:minilm-l6", "trained_quantized": False, "status": "ok", "problems": [],
        "adapter_vs_merged": {"max_abs_logit_diff": 9.1e-06, "argmax_agreement": 1.0, "logit_scale": 6.2},
        "tolerance": {"max_abs_logit_diff": 0.0016, "argmax_agreement": 1.0},
        "metric": {"name": "accuracy", "adapter": 0.8, "merged": 0.8}}))
    return out


def front_matter(card: str) -> dict:
    m = re.match(r"^---\n(.*?)\n---\n", card, re.S)
    assert m, "model card has no YAML front matter"
    return yaml.safe_load(m.group(1))


def everything_in(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file())


@pytest.fixture
def hf_env(monkeypatch, tmp_path):
    """A token in HF_TOKEN, no stored login, Hub calls allowed (tests set HF_HUB_OFFLINE=1 for everything else)."""
    import huggingface_hub.constants as c

    for k in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "HF_ENDPOINT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(c, "HF_TOKEN_PATH", str(tmp_path / "no-login" / "token"))
    monkeypatch.setattr(c, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-login" / "stored_tokens"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    return monkeypatch


# ---------------------------------------------------------------- staging and the card


def test_dry_run_stages_exactly_the_publishable_files(tmp_path, capsys, hf_env):
    run = make_run(tmp_path)
    out = tmp_path / "staged"
    assert main(["push", str(run), "--repo-id", "me/tweets", "--dry-run", "--output", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert sorted(p.name for p in out.iterdir()) == ADAPTER_FILES == printed["files"]
    assert not any(p.is_dir() for p in out.iterdir())  # no checkpoint-*/ or runs/
    assert not [p for p in out.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]
    assert printed["kind"] == "adapter" and printed["status"].startswith("staged")
    assert any(s.startswith("checkpoint-8/") for s in printed["skipped"])
    assert any(s.startswith("training_args.bin") for s in printed["skipped"])
    for name in ("adapter_model.safetensors", "tokenizer.json", "loss_curve.png", "chat_template.jinja"):
        assert (out / name).read_bytes() == (run / name).read_bytes()
    # the adapter names its base by Hub id, not by the local path it was trained from
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert cfg["modules_to_save"] == ["classifier"]
    assert json.loads((out / "metrics.json").read_text()) == METRICS


def test_model_card_front_matter_and_body(tmp_path):
    run = make_run(tmp_path)
    stage(run, tmp_path / "staged", "me/tweets")
    card = (tmp_path / "staged" / "README.md").read_text()
    meta = front_matter(card)
    assert meta["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert meta["library_name"] == "peft"
    assert meta["pipeline_tag"] == "text-classification"
    assert meta["datasets"] == ["mteb/tweet_sentiment_extraction"]
    assert {"lora", "lora_ft", "sequence-classification"} <= set(meta["tags"]) and "qlora" not in meta["tags"]
    assert "| accuracy | 0.8 | 0.33 |" in card  # eval metrics, with the before-training column
    assert "| neutral | 0.8 | 0.8 | 0.8 | 13 |" in card
    assert "| lora_r | 16 |" in card and "| learning_rate | 0.001 |" in card  # the recipe's hyperparameters
    assert "| LoRA target modules | query, value |" in card
    for figure in ("| runtime (s) | 12.5 |", "| samples / s | 40.2 |", "| tokens / s (non-pad) | 812 |",
                   "| peak memory (MB) | 321.5 |"):
        assert figure in card
    assert "![Loss curve](loss_curve.png)" in card
    # the classifier snippet passes the head size and label names: peft builds the base from its own config
    assert "AutoPeftModelForSequenceClassification.from_pretrained(" in card
    assert 'labels = ["negative", "neutral", "positive"]' in card
    for kw in ("num_labels=len(labels)", "id2label=dict(enumerate(labels))", "label2id={label: i"):
        assert kw in card


def test_builtin_and_local_names():
    assert hub_id_of("builtin:smollm2-135m-instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub_id_of("builtin:minilm-l6") == "sentence-transformers/all-MiniLM-L6-v2"
    assert hub_id_of("gpt2") == "gpt2" and hub_id_of("mteb/tweet_sentiment_extraction") == "mteb/tweet_sentiment_extraction"
    for local in ("/data/x", "../shared/data/tweets", "./m", "data.csv", "~/m", "a/b/c"):
        assert hub_id_of(local) is None


def test_qlora_causal_card(tmp_path):
    run = make_run(tmp_path, model_name_or_path="builtin:smollm2-135m-instruct", task="causal-lm", labels=None,
                   dataset_name=str(tmp_path), load_in_4bit=True, system_prompt="You are terse.")
    stage(run, tmp_path / "staged", "me/sft")
    card = (tmp_path / "staged" / "README.md").read_text()
    meta = front_matter(card)
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "qlora" in meta["tags"] and "causal-lm" in meta["tags"] and meta["pipeline_tag"] == "text-generation"
    assert "datasets" not in meta  # a local dataset path is not a Hub dataset
    assert "AutoPeftModelForCausalLM.from_pretrained(repo)" in card
    assert "apply_chat_template" in card and "You are terse." in card  # the template + system prompt it trained with
    assert "4-bit nf4" in card and "Q4_1 GGUF" in card  # quantization and builtin-weights provenance


def test_merged_model_folder(tmp_path):
    run = make_run(tmp_path)
    merged = make_merged(tmp_path, run)
    manifest = stage(merged, tmp_path / "staged", "me/tweets-merged")
    assert manifest["kind"] == "merged"
    assert manifest["files"] == ["README.md", "config.json", "confusion_matrix.png", "lora_ft_recipe.yaml",
                                 "loss_curve.png", "merge_report.json", "metrics.json", "model.safetensors",
                                 "tokenizer.json", "tokenizer_config.json"]
    card = (tmp_path / "staged" / "README.md").read_text()
    meta = front_matter(card)
    assert meta["library_name"] == "transformers" and meta["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert "AutoModelForSequenceClassification.from_pretrained(repo)" in card and "peft" not in card.split("## Usage")[1]
    assert "max |logit difference| 9.1e-06" in card and "status **ok**" in card  # merge provenance
    assert "| accuracy | 0.8 |" in card  # the metrics of the run it was merged from


def test_pushed_recipe_reruns_and_carries_no_local_paths(tmp_path):
    """trl's eos_token / pad_token are recipe keys, not secrets; the card and the staged JSON name no folder of
    this machine (output_dir, a local dataset, the run dir a merge came from)."""
    data = tmp_path / "my-data"
    run = make_run(tmp_path, model_name_or_path="builtin:smollm2-135m-instruct", task="causal-lm", labels=None,
                   dataset_name=str(data), eos_token="<|im_end|>", pad_token="<pad>")
    merged = make_merged(tmp_path, run)
    for src, out in ((run, tmp_path / "staged"), (merged, tmp_path / "staged-merged")):
        stage(src, out, "me/x")
        recipe = yaml.safe_load((out / RECIPE_FILE).read_text())
        assert recipe["eos_token"] == "<|im_end|>" and recipe["pad_token"] == "<pad>"
        assert recipe["dataset_name"] == "./my-data" and recipe["output_dir"] == "./run"
        for name in ("README.md", RECIPE_FILE, "metrics.json", "merge_report.json", "adapter_config.json"):
            if (out / name).is_file():
                assert str(tmp_path) not in (out / name).read_text(), name
        resolve(recipe)  # it parses as a recipe again


def test_redacts_secrets_and_never_writes_the_token(tmp_path, capsys, hf_env):
    run = make_run(tmp_path)
    with open(run / RECIPE_FILE, "a", encoding="utf-8") as fh:  # a recipe edited by hand after training
        fh.write(f"hub_token: {TOKEN}\nrun_name: 'tweets {TOKEN}'\n")
    out = tmp_path / "staged"
    assert main(["push", str(run), "--repo-id", "me/tweets", "--dry-run", "--output", str(out)]) == 0
    captured = capsys.readouterr()
    assert TOKEN not in captured.out + captured.err
    assert TOKEN.encode() not in everything_in(out)
    recipe = yaml.safe_load((out / RECIPE_FILE).read_text())
    assert recipe["hub_token"] == "***" and recipe["run_name"] == "tweets hf_***"


def test_token_found_in_a_staged_file_stops_the_push(tmp_path, hf_env, capsys):
    run = make_run(tmp_path)
    (run / "tokenizer_config.json").write_text(json.dumps({"note": f"{TOKEN}"}))  # no key name, no redaction
    rc = main(["push", str(run), "--repo-id", "me/tweets", "--dry-run", "--output", str(tmp_path / "staged")])
    err = capsys.readouterr().err
    assert rc == 2 and "tokenizer_config.json contains your Hugging Face token" in err and TOKEN not in err
    assert not (tmp_path / "staged").exists()
    from safetensors.numpy import save_file

    run = make_run(tmp_path, name="run2")
    save_file({"w": __import__("numpy").zeros(2, "float32")}, str(run / "adapter_model.safetensors"), metadata={"by": TOKEN})
    with pytest.raises(LoraFtError, match="adapter_model.safetensors contains your Hugging Face token"):
        stage(run, tmp_path / "staged", "me/x", token=TOKEN)


def test_pickled_weights_are_refused(tmp_path):
    run = make_run(tmp_path)
    (run / "adapter_model.safetensors").unlink()
    (run / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(LoraFtError, match=r"only pickled weights \(adapter_model.bin\).*safetensors only"):
        stage(run, tmp_path / "staged", "me/x")


def test_local_base_needs_base_model(tmp_path):
    run = make_run(tmp_path, model_name_or_path=str(tmp_path / "my-bert"))
    with pytest.raises(LoraFtError, match="--base-model"):
        stage(run, tmp_path / "staged", "me/x")
    stage(run, tmp_path / "staged", "me/x", base_model="google-bert/bert-base-uncased")
    assert json.loads((tmp_path / "staged" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        "google-bert/bert-base-uncased"


def test_output_folder_safety(tmp_path):
    run = make_run(tmp_path)
    with pytest.raises(LoraFtError, match="overlaps"):
        stage(run, run / "staged", "me/x")
    with pytest.raises(LoraFtError, match="overlaps"):
        stage(run, tmp_path, "me/x")  # holds the source: replacing it would delete the run
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(LoraFtError, match="not written by lora_ft.*--overwrite"):
        stage(run, busy, "me/x")
    other = make_run(tmp_path, name="other-run")  # a run dir: peft's README.md and a recipe, but no card of ours
    (other / "checkpoint-8").rename(other / "moved")
    shutil.rmtree(other / "moved")
    shutil.rmtree(other / "runs")
    with pytest.raises(LoraFtError, match="not written by lora_ft"):
        stage(run, other, "me/x")
    assert (other / "adapter_model.safetensors").is_file()
    stage(run, busy, "me/x", overwrite=True)
    assert not (busy / "notes.txt").exists()
    stage(run, tmp_path / "staged", "me/x")
    stage(run, tmp_path / "staged", "me/x")  # a previous staging is replaced
    with pytest.raises(LoraFtError, match="user/name"):
        stage(run, tmp_path / "other", "no-namespace")


def test_missing_token_is_one_line_with_the_fix(tmp_path, hf_env, capsys):
    hf_env.delenv("HF_TOKEN")
    rc = main(["push", str(make_run(tmp_path)), "--repo-id", "me/x"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "hf auth login" in err and "huggingface-cli login" in err and "HF_TOKEN" in err


def test_dry_run_needs_no_token(tmp_path, hf_env, capsys):
    hf_env.delenv("HF_TOKEN")
    assert main(["push", str(make_run(tmp_path)), "--repo-id", "me/x", "--dry-run", "--output", str(tmp_path / "s")]) == 0


# ---------------------------------------------------------------- a fake Hub on 127.0.0.1

VALID_LIBRARIES = {"peft", "transformers"}
VALID_PIPELINES = {"text-classification", "text-generation"}


class FakeHub:
    """Answers the Hub API calls of create_repo / create_branch / upload_folder and records every request."""

    def __init__(self, lfs: bool = False, fail: dict | None = None):
        self.lfs = lfs  # answer "lfs" upload mode for binary files, as the Hub does
        self.fail = fail or {}  # path regex -> (status, error message or JSON answer)
        self.requests: list[dict] = []
        self.repos: dict[str, dict] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.commits: list[dict] = []
        self.lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = 10  # an idle keep-alive connection ends its thread

            def log_message(self, *a):  # quiet; and never logs headers
                pass

            def do_GET(self):
                hub.handle(self)

            do_POST = do_PUT = do_HEAD = do_GET

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.watchdog = threading.Timer(120, self.server.shutdown)  # stops by itself whatever the test does
        self.watchdog.daemon = True

    def __enter__(self):
        self.thread.start()
        self.watchdog.start()
        return self

    def __exit__(self, *exc):
        self.watchdog.cancel()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)

    # -------------------------------------------------------- plumbing

    @staticmethod
    def _body(h) -> bytes:
        if h.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(h.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    h.rfile.readline()
                    return data
                data += h.rfile.read(size)
                h.rfile.readline()
        return h.rfile.read(int(h.headers.get("Content-Length") or 0))

    @staticmethod
    def _send(h, status: int, obj=None, content_type="application/json"):
        body = json.dumps(obj if obj is not None else {}).encode()
        h.send_response(status)
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(len(body)))
        if status >= 400 and isinstance(obj, dict) and "error" in obj:
            h.send_header("X-Error-Message", obj["error"])
        h.end_headers()
        h.wfile.write(body)

    def handle(self, h):
        path, _, query = h.path.partition("?")
        body = self._body(h)
        with self.lock:
            self.requests.append({"method": h.command, "path": path, "query": query, "body": body,
                                  "authorization": h.headers.get("Authorization")})
        for pattern, (status, answer) in self.fail.items():
            if re.fullmatch(pattern, path):
                return self._send(h, status, answer if isinstance(answer, dict) else {"error": answer})
        routes = [
            ("POST", r"/api/repos/create", self.create_repo),
            ("POST", r"/api/validate-yaml", self.validate_yaml),
            ("POST", r"/api/models/([^/]+/[^/]+)/branch/([^/]+)", self.create_branch),
            ("POST", r"/api/models/([^/]+/[^/]+)/preupload/([^/]+)", self.preupload),
            ("POST", r"/api/models/([^/]+/[^/]+)/commit/([^/]+)", self.commit),
            ("POST", r"/([^/]+/[^/]+)\.git/info/lfs/objects/batch", self.lfs_batch),
            ("PUT", r"/lfs-storage/([0-9a-f]{64})", self.lfs_put),
            ("POST", r"/lfs-verify", self.lfs_verify),
        ]
        for method, pattern, fn in routes:
            m = re.fullmatch(pattern, path)
            if m and h.command == method:
                status, obj = fn(body, *m.groups())
                return self._send(h, status, obj)
        self._send(h, 404, {"error": f"fake hub: no route for {h.command} {path}"})

    # -------------------------------------------------------- API

    def create_repo(self, body):
        p = json.loads(body)
        repo = f"{p['organization']}/{p['name']}"
        if repo in self.repos:
            return 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo}"}
        self.repos[repo] = {"visibility": p.get("visibility"), "type": p.get("type"), "branches": {"main": {}}}
        return 200, {"url": f"{self.url}/{repo}", "name": repo}

    def create_branch(self, body, repo, branch):
        if repo not in self.repos:
            return 404, {"error": "Repository not found"}
        if branch in self.repos[repo]["branches"]:
            return 409, {"error": "Branch already exists"}
        self.repos[repo]["branches"][branch] = dict(self.repos[repo]["branches"]["main"])
        return 200, {}

    def validate_yaml(self, body):
        """The metadata checks this fake can make honestly: parseable front matter with well-typed known keys."""
        content = json.loads(body)["content"]
        m = re.match(r"^---\n(.*?)\n---\n", content, re.S)
        errors = []
        meta = yaml.safe_load(m.group(1)) if m else None
        if not isinstance(meta, dict):
            errors.append("README.md has no YAML metadata block")
        else:
            if not (isinstance(meta.get("base_model"), str) and re.fullmatch(r"[\w.-]+(/[\w.-]+)?", meta["base_model"])):
                errors.append('"base_model" must be a Hub model id')
            if meta.get("library_name") not in VALID_LIBRARIES:
                errors.append('"library_name" is not a known library')
            if meta.get("pipeline_tag") not in VALID_PIPELINES:
                errors.append('"pipeline_tag" is not a known pipeline')
            if not all(isinstance(t, str) for t in meta.get("tags", [])):
                errors.append('"tags" must be a list of strings')
        return (400, {"errors": [{"message": e} for e in errors]}) if errors else (200, {"errors": [], "warnings": []})

    def preupload(self, body, repo, rev):
        if repo not in self.repos:
            return 404, {"error": "Repository not found"}
        files = []
        for f in json.loads(body)["files"]:
            sample = base64.b64decode(f["sample"])
            binary = f["path"].endswith(".safetensors") or b"\x00" in sample or not _is_utf8(sample)
            files.append({"path": f["path"], "uploadMode": "lfs" if self.lfs and binary else "regular",
                          "shouldIgnore": False, "oid": None})
        return 200, {"files": files, "commitOid": "0" * 40}

    def lfs_batch(self, body, repo):
        p = json.loads(body)
        assert p["operation"] == "upload" and p["hash_algo"] == "sha256"
        objects = [{"oid": o["oid"], "size": o["size"], "authenticated": True,
                    "actions": {"upload": {"href": f"{self.url}/lfs-storage/{o['oid']}"},
                                "verify": {"href": f"{self.url}/lfs-verify"}}} for o in p["objects"]]
        return 200, {"transfer": "basic", "objects": objects}

    def lfs_put(self, body, oid):
        if hashlib.sha256(body).hexdigest() != oid:
            return 400, {"error": "sha256 mismatch"}
        self.lfs_objects[oid] = body
        return 200, {}

    def lfs_verify(self, body):
        p = json.loads(body)
        ok = p["oid"] in self.lfs_objects and len(self.lfs_objects[p["oid"]]) == p["size"]
        return (200, {}) if ok else (404, {"error": "object not uploaded"})

    def commit(self, body, repo, rev):
        from urllib.parse import unquote

        rev = unquote(rev)
        if repo not in self.repos:
            return 404, {"error": "Repository not found"}
        if rev not in self.repos[repo]["branches"]:
            return 404, {"error": f"Invalid rev id: {rev}"}
        lines = [json.loads(x) for x in body.decode().splitlines() if x.strip()]
        assert lines[0]["key"] == "header"
        files = {}
        for item in lines[1:]:
            v = item["value"]
            if item["key"] == "file":
                assert v["encoding"] == "base64"
                files[v["path"]] = base64.b64decode(v["content"])
            elif item["key"] == "lfsFile":
                if v["oid"] not in self.lfs_objects:
                    return 400, {"error": f"LFS pointer to a missing object: {v['path']}"}
                files[v["path"]] = ("lfs", v["oid"])
            else:
                return 400, {"error": f"unexpected commit operation {item['key']}"}
        self.repos[repo]["branches"][rev].update(files)
        oid = hashlib.sha1(body).hexdigest()
        self.commits.append({"repo": repo, "revision": rev, "header": lines[0]["value"], "files": files, "oid": oid})
        return 200, {"commitUrl": f"{self.url}/{repo}/commit/{oid}", "commitOid": oid, "success": True}


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError as e:
        return e.start >= len(b) - 3 and e.reason == "unexpected end of data"  # a sample cut mid-character


def _api_calls(hub: FakeHub) -> list[str]:
    return [f"{r['method']} {r['path']}" for r in hub.requests]


def _assert_token_only_in_auth_header(hub: FakeHub, out: str):
    assert TOKEN not in out
    for r in hub.requests:
        assert TOKEN.encode() not in r["body"]
        if r["path"] == "/api/agent-harnesses":  # huggingface_hub's daily user-agent registry fetch: anonymous
            assert r["authorization"] is None
        elif r["path"].startswith("/api/") or ".git/info/lfs" in r["path"]:
            assert r["authorization"] == f"Bearer {TOKEN}", r["path"]


def test_push_uploads_exactly_the_staged_folder(tmp_path, hf_env, capsys):
    """The default pipeline (hf_xet installed), every file committed inline: bytes compared one by one."""
    run = make_run(tmp_path)
    staged = tmp_path / "staged"
    with FakeHub() as hub:
        rc = main(["push", str(run), "--repo-id", "me/tweets", "--private", "--output", str(staged),
                   "--endpoint", hub.url, "--commit-message", "first push"])
        captured = capsys.readouterr()
        assert rc == 0, captured.err
    assert _api_calls(hub) == ["POST /api/repos/create", "POST /api/validate-yaml", "POST /api/models/me/tweets/preupload/main",
                               "POST /api/models/me/tweets/commit/main"]
    create = json.loads(hub.requests[0]["body"])
    assert create == {"name": "tweets", "organization": "me", "visibility": "private", "type": "model"}
    (commit,) = hub.commits
    assert commit["header"]["summary"] == "first push"
    assert sorted(commit["files"]) == ADAPTER_FILES == sorted(p.name for p in staged.iterdir())
    for name, content in commit["files"].items():
        assert content == (staged / name).read_bytes(), name
    printed = json.loads(captured.out)
    assert printed["status"] == "pushed" and printed["commit"] == commit["oid"]
    assert printed["url"] == f"{hub.url}/me/tweets"
    _assert_token_only_in_auth_header(hub, captured.out + captured.err)


def test_push_lfs_path_and_existing_repo(tmp_path, hf_env, capsys):
    """xet off: weights and PNGs go through the git-LFS batch API (PUT + verify) and the commit points at them."""
    import huggingface_hub.constants as c

    hf_env.setattr(c, "HF_HUB_DISABLE_XET", True)
    run = make_run(tmp_path)
    with FakeHub(lfs=True) as hub:
        hub.repos["me/tweets"] = {"visibility": "public", "type": "model", "branches": {"main": {"old.txt": b"x"}}}
        hf_env.setenv("HF_ENDPOINT", hub.url)  # the endpoint from the environment, as users set it
        rc = main(["push", str(run), "--repo-id", "me/tweets", "--revision", "dev"])
        captured = capsys.readouterr()
        assert rc == 0, captured.err
    calls = _api_calls(hub)
    assert calls[:3] == ["POST /api/repos/create", "POST /api/models/me/tweets/branch/dev", "POST /api/validate-yaml"]
    assert "POST /me/tweets.git/info/lfs/objects/batch" in calls and calls[-1] == "POST /api/models/me/tweets/commit/dev"
    (commit,) = hub.commits
    assert commit["revision"] == "dev" and commit["header"]["summary"] == "lora-ft push: adapter from run"
    assert sorted(commit["files"]) == ADAPTER_FILES
    lfs = {name for name, v in commit["files"].items() if isinstance(v, tuple)}
    assert lfs == {"adapter_model.safetensors", "loss_curve.png", "confusion_matrix.png"}
    for name in lfs:
        oid = commit["files"][name][1]
        expected = (run / name).read_bytes()
        assert oid == hashlib.sha256(expected).hexdigest() and hub.lfs_objects[oid] == expected
    assert json.loads(commit["files"]["adapter_config.json"])["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert front_matter(commit["files"]["README.md"].decode())["library_name"] == "peft"
    assert hub.repos["me/tweets"]["visibility"] == "public"  # an existing repo is reused (409 -> exist_ok)
    _assert_token_only_in_auth_header(hub, captured.out + captured.err)


def test_push_from_the_installed_cli(tmp_path):
    """`lora-ft push` as a user runs it: token and endpoint from the environment; nothing printed carries the token."""
    run = make_run(tmp_path)
    merged = make_merged(tmp_path, run)
    env = {**os.environ, "HF_TOKEN": TOKEN, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
           "HF_HOME": str(tmp_path / "hf-home")}
    with FakeHub() as hub:
        env["HF_ENDPOINT"] = hub.url
        proc = subprocess.run([str(Path(sys.executable).parent / "lora-ft"), "push", str(merged), "--repo-id", "me/merged"],
                              capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    (commit,) = hub.commits
    assert sorted(commit["files"]) == json.loads(proc.stdout)["files"]
    assert "merge_report.json" in commit["files"] and "model.safetensors" in commit["files"]
    _assert_token_only_in_auth_header(hub, proc.stdout + proc.stderr)


def test_unreachable_endpoint_is_one_line(tmp_path, hf_env, capsys):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rc = main(["push", str(make_run(tmp_path)), "--repo-id", "me/x", "--endpoint", f"http://127.0.0.1:{port}"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert f"cannot reach http://127.0.0.1:{port}" in err and "Traceback" not in err and TOKEN not in err


@pytest.mark.parametrize("status, expect", [(401, "rejected the token"), (403, "no write access to me/x")])
def test_hub_refusals_are_one_line(tmp_path, hf_env, capsys, status, expect):
    with FakeHub(fail={r"/api/repos/create": (status, f"denied for {TOKEN}")}) as hub:
        rc = main(["push", str(make_run(tmp_path)), "--repo-id", "me/x", "--endpoint", hub.url])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and expect in err, err
    assert TOKEN not in err  # even when the server echoes it


def test_rejected_card_metadata_is_one_line(tmp_path, hf_env, capsys):
    answer = {"errors": [{"message": '"base_model" is not a valid model id'}]}  # the Hub's validate-yaml error shape
    with FakeHub(fail={r"/api/validate-yaml": (400, answer)}) as hub:
        rc = main(["push", str(make_run(tmp_path)), "--repo-id", "me/x", "--endpoint", hub.url])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert 'refused the upload (Invalid metadata in README.md.; "base_model" is not a valid model id)' in err
    assert hub.commits == []


def test_failed_lfs_upload_is_one_line(tmp_path, hf_env, capsys):
    """huggingface_hub wraps a failed LFS PUT in RuntimeError; the cause still comes out as one line."""
    import huggingface_hub.constants as c

    hf_env.setattr(c, "HF_HUB_DISABLE_XET", True)
    with FakeHub(lfs=True, fail={r"/lfs-storage/[0-9a-f]+": (400, "bad upload")}) as hub:
        rc = main(["push", str(make_run(tmp_path)), "--repo-id", "me/x", "--endpoint", hub.url])
    err = capsys.readouterr().err  # huggingface_hub's own LFS progress bar may precede the error
    errors = [line for line in err.splitlines() if line.startswith("lora-ft: error:")]
    assert rc == 2 and len(errors) == 1 and "answered 400 during upload" in errors[0], err
    assert err.rstrip().endswith(errors[0]) and hub.commits == [] and "Traceback" not in err


def test_offline_mode_is_named(tmp_path, hf_env, capsys):
    import huggingface_hub.constants as c

    hf_env.setattr(c, "HF_HUB_OFFLINE", True)
    rc = main(["push", str(make_run(tmp_path)), "--repo-id", "me/x", "--endpoint", "http://127.0.0.1:9"])
    err = capsys.readouterr().err
    assert rc == 2 and "HF_HUB_OFFLINE" in err and "--dry-run" in err


# ---------------------------------------------------------------- the card's snippets run


def _word_tokenizer(out: Path, chat: bool = False):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "what", "a", "great", "day", "write", "haiku",
             "about", "rain", "user", "assistant", "system", "you", "are", "terse", "."]
    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="[PAD]", unk_token="[UNK]", bos_token="<s>",
                                  eos_token="<|im_end|>" if chat else "</s>")
    if chat:
        tok.chat_template = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> "
                             "{% endfor %}{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")
    tok.save_pretrained(out)
    return tok


def _snippet(card: str, repo_id: str, local: Path) -> str:
    code = card.split("## Usage")[1].split("```python\n")[1].split("```")[0]
    assert f'repo = "{repo_id}"' in code
    return code.replace(f'repo = "{repo_id}"', f"repo = {str(local)!r}")


def test_classifier_adapter_snippet_runs(tmp_path, capsys):
    """The card's snippet, pointed at the staged folder, gives the trained model's logits."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    base = tmp_path / "base"
    tok = _word_tokenizer(base)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, pad_token_id=tok.pad_token_id)).save_pretrained(base)
    model = BertForSequenceClassification.from_pretrained(base, num_labels=3, id2label=dict(enumerate(LABELS)),
                                                          label2id={n: i for i, n in enumerate(LABELS)})
    model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query", "value"],
                                             init_lora_weights=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "modules_to_save" in name:
                p.normal_(0, 1)
    run = tmp_path / "run"
    model.save_pretrained(run)
    tok.save_pretrained(run)
    _recipe(run, model_name_or_path=str(base), dataset_name=str(tmp_path))
    stage(run, tmp_path / "staged", "me/cls", base_model=str(base))  # a local base, so the snippet runs offline
    code = _snippet((tmp_path / "staged" / "README.md").read_text(), "me/cls", tmp_path / "staged")
    ns: dict = {}
    exec(compile(code, "card-snippet", "exec"), ns)
    model.eval()
    with torch.no_grad():
        want = model(**tok(["what a great day"], return_tensors="pt")).logits.softmax(-1)[0]
    torch.testing.assert_close(ns["probs"], want)
    assert capsys.readouterr().out.split()[0] == LABELS[int(want.argmax())]


def test_causal_chat_adapter_snippet_runs(tmp_path, capsys):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    base = tmp_path / "base"
    tok = _word_tokenizer(base, chat=True)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2, pad_token_id=tok.pad_token_id,
                                 bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)).save_pretrained(base)
    model = get_peft_model(LlamaForCausalLM.from_pretrained(base),
                           LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    run = tmp_path / "run"
    model.save_pretrained(run)
    tok.save_pretrained(run)
    _recipe(run, model_name_or_path=str(base), task="causal-lm", labels=None, dataset_name=str(tmp_path),
            system_prompt="you are terse .", use_chat_template=True, generation_max_new_tokens=5)
    stage(run, tmp_path / "staged", "me/sft", base_model=str(base))
    code = _snippet((tmp_path / "staged" / "README.md").read_text(), "me/sft", tmp_path / "staged")
    ns: dict = {}
    exec(compile(code, "card-snippet", "exec"), ns)
    msgs = [{"role": "system", "content": "you are terse ."}, {"role": "user", "content": "Write a haiku about rain"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        want = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert ns["output"].tolist() == want.tolist()
