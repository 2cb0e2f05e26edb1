"""Publishing to the Hugging Face Hub: stage what is uploaded (staging.py), write its model card (card.py), upload that
folder (upload.py); names.py holds repo ids, the token and the file lists.

`stage()` copies an allowlist of a run dir (or a `lora-ft merge` folder) into a fresh folder and writes the
model card there; `upload()` sends that folder and nothing else. `lora-ft push --dry-run --output DIR` is the
same staging, so DIR shows byte for byte what a push publishes.

Never staged: pickles (*.bin, *.pt, *.pth, *.pkl, *.ckpt: they run code when loaded), subfolders
(checkpoint-N/ trainer states with optimizer and RNG pickles, runs/ TensorBoard logs), eval_predictions.jsonl
and eval_generations.jsonl (they quote the eval data), log_history.json, and the run's own README.md (peft's
placeholder card; ours replaces it). The token is read from HF_TOKEN or the stored `hf auth login` token and
only ever goes into the Authorization header of the upload requests.
"""

from .card import model_card, usage_snippet
from .names import ADAPTER, CARD_FILE, CARD_MARK, MERGED, MODEL, check_repo_id, get_token, hub_id_of, require_token
from .staging import detect, stage
from .upload import DEFAULT_ENDPOINT, resolve_endpoint, upload

__all__ = ["ADAPTER", "CARD_FILE", "CARD_MARK", "DEFAULT_ENDPOINT", "MERGED", "MODEL", "check_repo_id", "detect",
           "get_token", "hub_id_of", "model_card", "require_token", "resolve_endpoint", "stage", "upload", "usage_snippet"]
