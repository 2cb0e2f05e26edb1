"""Guards for lora_ft's patches of upstream internals.

Some of lora_ft's speed and correctness work reaches into code the upstream libraries do not promise to keep:
private bitsandbytes symbols called through ctypes, peft's DoRA layer class, trl's fused LM-head output, private
Trainer methods. Each such patch names what it relies on here (a library, symbols, signatures). Before it installs,
`usable(name)` checks the installed library against pyproject.toml's tested range and the patch's own checks. On a
mismatch the patch stays off, one warning line says why, and the library's own path runs: slower, never wrong.
"""

from __future__ import annotations

import functools
import inspect
import sys
from dataclasses import dataclass
from importlib import metadata
from typing import Callable, Optional

DIST = "lora-ft"


@dataclass(frozen=True)
class Patch:
    name: str
    library: str
    what: str  # what the patch does, for `lora-ft env` and the warning
    check: Callable[[], Optional[str]]  # None when everything it relies on is there, else what differs


def _params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


def expect_params(fn, *names: str) -> Optional[str]:
    """None when `fn` takes exactly these parameters (in this order), else what it takes."""
    got = _params(fn)
    return None if got == list(names) else f"{getattr(fn, '__qualname__', fn)}({', '.join(got)}) is not ({', '.join(names)})"


def expect_attrs(obj, *names: str) -> Optional[str]:
    missing = [n for n in names if not hasattr(obj, n)]
    return None if not missing else f"{getattr(obj, '__name__', obj)} has no {', '.join(missing)}"


def first_problem(*problems: Optional[str]) -> Optional[str]:
    return next((p for p in problems if p), None)


# ---------------------------------------------------------------- versions


@functools.lru_cache(maxsize=None)
def tested_ranges() -> dict[str, str]:
    """{library: specifier} from lora_ft's own install metadata (pyproject.toml's dependencies: one home)."""
    from packaging.requirements import Requirement

    try:
        reqs = metadata.requires(DIST) or []
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return {}
    out = {}
    for line in reqs:
        r = Requirement(line)
        if r.marker is None:
            out[r.name.lower()] = str(r.specifier)
    return out


def installed_version(library: str) -> Optional[str]:
    try:
        return metadata.version(library)
    except metadata.PackageNotFoundError:
        return None


def version_problem(library: str) -> Optional[str]:
    from packaging.specifiers import SpecifierSet

    have = installed_version(library)
    if have is None:
        return f"{library} is not installed"
    spec = tested_ranges().get(library.lower())
    if spec and not SpecifierSet(spec).contains(have, prereleases=True):
        return f"{library} {have} is outside the tested range {spec}"
    return None


# ---------------------------------------------------------------- the registry of patches

_PATCHES: dict[str, Patch] = {}
_WARNED: set[str] = set()


def register(patch: Patch) -> Patch:
    _PATCHES[patch.name] = patch
    return patch


def patches() -> dict[str, Patch]:
    """Every guarded patch, its module imported so it has registered itself."""
    import importlib

    for module in ("cpu.linear4bit", "cpu.dora", "cpu.lm_head", "cpu.memory", "cpu.fsdp", "trainers", "modeling"):
        importlib.import_module(f"lora_ft.{module}")
    return dict(_PATCHES)


@functools.lru_cache(maxsize=None)
def problem(name: str) -> Optional[str]:
    """Why patch `name` cannot be used with the installed libraries, or None."""
    patch = _PATCHES[name]
    try:
        return version_problem(patch.library) or patch.check()
    except Exception as e:  # an import or attribute that moved: the patch stays off
        return f"{type(e).__name__}: {e}"


def usable(name: str) -> bool:
    """Whether patch `name` may install. The first refusal prints one warning line."""
    why = problem(name)
    if why and name not in _WARNED:
        _WARNED.add(name)
        patch = _PATCHES[name]
        print(f"[lora_ft] warning: {name} ({patch.what}) is off: {why}; {patch.library}'s own path runs instead",
              file=sys.stderr, flush=True)
    return why is None


def reset() -> None:
    """Forget the checks made so far (tests that simulate a mismatch)."""
    problem.cache_clear()
    tested_ranges.cache_clear()
    _WARNED.clear()
