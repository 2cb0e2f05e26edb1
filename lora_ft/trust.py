"""Trust is given by whoever runs the command, never read from the artifact being loaded.

A run dir is shared and downloaded like any file: one whose saved recipe says `trust_remote_code: true` with
`model_name_or_path: someone/repo` would otherwise run that repo's Python on the loading machine. So commands
that load a run dir or merged folder take both flags from their own command line only; the recipe being
trained is the one place a recipe may grant them (its author is the person running it).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .config import RECIPE_FILE
from .errors import LoraFtError

FLAGS = {"trust_remote_code": "--trust-remote-code", "allow_pickle": "--allow-pickle"}


@dataclass(frozen=True)
class Trust:
    trust_remote_code: bool = False
    allow_pickle: bool = False


NONE = Trust()


def add_trust_args(p) -> None:
    """The two flags, for a command that loads a run dir or a merged folder."""
    p.add_argument("--trust-remote-code", "--trust_remote_code", dest="trust_remote_code", action="store_true",
                   help="run modelling code shipped with the model (its saved recipe cannot grant this)")
    p.add_argument("--allow-pickle", "--allow_pickle", dest="allow_pickle", action="store_true",
                   help="accept pickled .bin weights (its saved recipe cannot grant this)")


def from_args(args) -> Trust:
    return Trust(bool(getattr(args, "trust_remote_code", False)), bool(getattr(args, "allow_pickle", False)))


def granted(recipe, trust: Trust, where) -> object:
    """`recipe` (loaded from `where`) with both flags set from `trust`; refuses a recipe that asks for more."""
    for key, flag in FLAGS.items():
        if getattr(recipe.args, key) and not getattr(trust, key):
            raise LoraFtError(f"{where}: its {RECIPE_FILE} asks for {key}: true, which lora_ft takes only from the "
                              f"command line; pass {flag} if you trust {recipe.args.model_name_or_path}")
    return replace(recipe, args=replace(recipe.args, trust_remote_code=trust.trust_remote_code,
                                        allow_pickle=trust.allow_pickle))
