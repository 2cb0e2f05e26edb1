"""Word-level tag sequences: scheme detection (IOB1, IOB2, BIOES), conversion to IOB2, entity spans, word splitting.

Pure functions over lists of strings: no model code, no heavy imports.
"""

from __future__ import annotations

import re
from typing import Optional

from .errors import DataError

SCHEMES = ("IOB1", "IOB2", "BIOES")
# Words of a raw text: abbreviations (U.S.), words with inner hyphens or apostrophes, then any other symbol alone.
# Close to CoNLL-2003's tokenization, which splits punctuation off words.
WORD = re.compile(r"(?:[^\W\d_]\.){2,}|\w+(?:[-'’]\w+)*|[^\w\s]")


def split_words(text: str) -> tuple[list[str], list[tuple[int, int]]]:
    """(words, (start, end) character offsets into text) of a raw text."""
    spans = [(m.start(), m.end()) for m in WORD.finditer(text)]
    return [text[a:b] for a, b in spans], spans


def join_words(words: list[str]) -> tuple[str, list[tuple[int, int]]]:
    """A pre-tokenized sentence as text (words joined by one space) and each word's offsets in it."""
    spans, pos = [], 0
    for w in words:
        spans.append((pos, pos + len(w)))
        pos += len(w) + 1
    return " ".join(words), spans


def _split(tag: str) -> tuple[str, Optional[str]]:
    if tag == "O":
        return "O", None
    if len(tag) > 2 and tag[1] in "-_" and tag[0] in "BIESL":
        return tag[0], tag[2:]
    return "?", None


def bad_tag(tag: str) -> bool:
    return _split(tag)[0] == "?"


def iob2_violation(tags: list[str]) -> Optional[int]:
    """Index of the first I-X that does not continue a B-X / I-X (IOB2 requires every entity to start with B-)."""
    prev = "O"
    for i, t in enumerate(tags):
        p, typ = _split(t)
        if p == "I":
            pp, ptyp = _split(prev)
            if pp not in ("B", "I") or ptyp != typ:
                return i
        prev = t
    return None


def iob1_violation(tags: list[str]) -> Optional[int]:
    """Index of the first B-X that does not follow an X token (IOB1 uses B- only between two same-type entities)."""
    prev = "O"
    for i, t in enumerate(tags):
        p, typ = _split(t)
        if p == "B" and _split(prev)[1] != typ:
            return i
        prev = t
    return None


def bioes_violation(tags: list[str]) -> Optional[int]:
    """Index of the first tag that breaks BIOES: I-/E- must continue B-/I- of their type; B-/I- must be continued."""
    prev = "O"
    for i, t in enumerate(tags + ["O"]):
        p, typ = _split(t)
        pp, ptyp = _split(prev)
        open_entity = pp in ("B", "I")
        if p in ("I", "E") and not (open_entity and ptyp == typ):
            return i
        if open_entity and p not in ("I", "E"):
            return i - 1
        prev = t
    return None


def detect_scheme(sentences: list[list[str]], requested: str, where) -> str:
    """The scheme of all sentences: requested (checked), or detected. where(i, j) names sentence i, word j for errors."""
    for i, tags in enumerate(sentences):
        for j, t in enumerate(tags):
            if bad_tag(t):
                raise DataError(f"{where(i, j)}: tag '{t}' is not O or B-/I-/E-/S- plus a type; fix the data "
                                "(or map integer tags with labels:)")
    if requested == "auto":
        if any(_split(t)[0] in ("E", "S") for tags in sentences for t in tags):
            requested = "BIOES"
        elif all(iob2_violation(tags) is None for tags in sentences):
            return "IOB2"
        elif all(iob1_violation(tags) is None for tags in sentences):
            return "IOB1"
        else:  # neither: most data is meant as IOB2, so its first break is the useful one to report
            requested = "IOB2"
    check = {"IOB1": iob1_violation, "IOB2": iob2_violation, "BIOES": bioes_violation}[requested]
    for i, tags in enumerate(sentences):
        j = check(tags)
        if j is not None:
            raise DataError(f"{where(i, j)}: tag '{(tags + ['O'])[j]}' after '{tags[j - 1] if j else 'start'}' breaks "
                            f"{requested}; fix the data, or set tag_scheme to the scheme it uses ({', '.join(SCHEMES)})")
    return requested


def to_iob2(tags: list[str], scheme: str) -> list[str]:
    """Tags of one sentence in IOB2 (the scheme seqeval's strict mode and lora_ft's models use)."""
    out, prev = [], "O"
    for t in tags:
        p, typ = _split(t)
        if p == "O":
            out.append("O")
        elif scheme == "BIOES":
            out.append(("B-" if p in ("B", "S") else "I-") + typ)
        elif scheme == "IOB1" and p == "I" and _split(prev)[1] != typ:
            out.append("B-" + typ)
        else:
            out.append(f"{p}-{typ}")
        prev = t
    return out


def spans(tags: list[str], strict: bool = False) -> list[tuple[str, int, int]]:
    """(type, first word, last word + 1) of each entity in IOB2 tags. An I- that does not continue its type starts
    an entity (as transformers' pipeline groups predictions), so predicted sequences always decode; strict: it is
    no entity (seqeval's strict mode, which the F1 figures use)."""
    out: list[list] = []
    for i, t in enumerate(tags):
        p, typ = _split(t)
        if p == "O" or p == "?":
            continue
        if p == "I" and out and out[-1][0] == typ and out[-1][2] == i:
            out[-1][2] = i + 1
        elif p == "B" or not strict:
            out.append([typ, i, i + 1])
    return [tuple(s) for s in out]


def label_order(tags) -> list[str]:
    """O first, then by entity type, B- before I-: stable ids whatever order the data lists tags in."""
    return sorted(set(tags), key=lambda t: (t != "O", _split(t)[1] or "", _split(t)[0]))
