"""Text cleaning (recipe options, applied the same way in training, eval and serving) and EDA-style augmentation of
small training sets (train split only, seeded), with synonyms found offline among the model's own input embeddings."""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Optional

from .errors import RecipeError

URL = re.compile(r"(https?://|www\.)\S+", re.I)
MENTION = re.compile(r"(?<!\w)@\w+")
SPACE = re.compile(r"\s+")
OPS = ("synonym", "swap", "delete", "insert")


def clean_text(text: str, a) -> str:
    """The recipe's cleaning options, in a fixed order. A no-op when all are off (the default)."""
    if a.clean_urls:
        text = URL.sub(" ", text)
    if a.clean_mentions:
        text = MENTION.sub(" ", text)
    if a.clean_lowercase:
        text = text.lower()
    if a.clean_whitespace or a.clean_urls or a.clean_mentions:
        text = SPACE.sub(" ", text).strip()
    return text


def parse_augment(spec: Optional[str]) -> dict[str, float]:
    """'synonym:0.1,swap:0.1,delete:0.1' -> {op: rate}; rates in (0, 1]."""
    if not spec:
        return {}
    out = {}
    for part in spec.split(","):
        name, _, rate = part.strip().partition(":")
        if name not in OPS:
            raise RecipeError([f"augment: '{name}' is not one of {', '.join(OPS)} (write e.g. synonym:0.1,swap:0.1)"])
        try:
            r = float(rate)
        except ValueError:
            raise RecipeError([f"augment: {name} needs a rate, e.g. {name}:0.1"]) from None
        if not 0 < r <= 1:
            raise RecipeError([f"augment: {name}:{rate} must be in (0, 1]"])
        out[name] = r
    return out


class EmbeddingSynonyms:
    """Nearest word in the model's input embedding space (cosine), among whole-word vocabulary entries."""

    def __init__(self, tokenizer, embeddings):
        vocab = tokenizer.get_vocab()
        marked = any(t.startswith(("Ġ", "▁")) for t in vocab)  # BPE / SentencePiece mark word starts; WordPiece marks "##" continuations
        first: dict[str, int] = {}
        for tok, tid in sorted(vocab.items(), key=lambda kv: kv[1]):
            if tid >= embeddings.shape[0] or tok.startswith("##") or (marked and tok[:1] not in ("Ġ", "▁")):
                continue
            surface = tokenizer.convert_tokens_to_string([tok]).strip()
            if surface.isalpha() and surface.islower() and len(surface) >= 3:
                first.setdefault(surface, tid)
        self.words = list(first)
        self.index = {w: i for i, w in enumerate(self.words)}
        e = embeddings[list(first.values())].float()
        self.emb = e / e.norm(dim=1, keepdim=True).clamp_min(1e-8)
        self.cache: dict[str, Optional[str]] = {}

    def __call__(self, word: str) -> Optional[str]:
        w = word.lower()
        if w not in self.cache:
            i = self.index.get(w)
            if i is None:
                self.cache[w] = None
            else:
                sims = self.emb @ self.emb[i]
                sims[i] = -1.0
                for j in sims.topk(8).indices.tolist():
                    cand = self.words[j]
                    if not (w in cand or cand in w):  # skip variants of the word itself: happy -> unhappy, happier
                        self.cache[w] = cand
                        break
                else:
                    self.cache[w] = None
        syn = self.cache[w]
        if syn is None:
            return None
        return syn.capitalize() if word[:1].isupper() else syn


def load_input_embeddings(model_path: str):
    """The input embedding matrix from a checkpoint's safetensors (no model load)."""
    from safetensors import safe_open

    names = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "shared.weight")
    for f in sorted(Path(model_path).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                if k.endswith(names):
                    return st.get_tensor(k)
    raise RecipeError([f"augment: synonym needs input embeddings in {model_path} (*.safetensors); drop synonym or use a local model"])


def augment_text(text: str, ops: dict[str, float], rng: random.Random, synonyms=None) -> str:
    """One EDA variant (Wei & Zou 2019): each op changes max(1, rate x words) words."""
    words = text.split()
    if len(words) < 2:
        return text
    for op, rate in ops.items():
        n = max(1, int(rate * len(words)))
        if op == "swap":
            for _ in range(n):
                i, j = rng.randrange(len(words)), rng.randrange(len(words))
                words[i], words[j] = words[j], words[i]
        elif op == "delete":
            kept = [w for w in words if rng.random() > rate]
            words = kept if kept else [rng.choice(words)]
        elif op in ("synonym", "insert") and synonyms is not None:
            order = list(range(len(words)))
            rng.shuffle(order)
            done = 0
            for i in order:
                core = words[i].strip(".,!?;:'\"()")
                syn = synonyms(core) if core.isalpha() else None
                if syn is None:
                    continue
                if op == "synonym":
                    words[i] = words[i].replace(core, syn)
                else:
                    words.insert(rng.randrange(len(words) + 1), syn)
                done += 1
                if done >= n:
                    break
    return " ".join(words)


def augment_rows(texts: list[str], ops: dict[str, float], copies: int, seed: int, synonyms=None) -> list[tuple[int, str]]:
    """(source row index, augmented text) for `copies` variants of every text; identical variants are dropped."""
    rng = random.Random(seed)
    out = []
    for i, t in enumerate(texts):
        seen = {t}
        for _ in range(copies):
            v = augment_text(t, ops, rng, synonyms)
            if v not in seen:
                seen.add(v)
                out.append((i, v))
    return out
