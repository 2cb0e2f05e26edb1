"""Writing an output folder or file: atomically, and never over something lora_ft did not write.

Every command that writes (merge, export, compress, push --dry-run, data inspect's PNG, search, compare) goes
through here, so the rules are the same everywhere:
- an output that equals, holds or sits inside a source is refused (`merge runs/x --output runs/x` would otherwise
  replace the adapter it merged from, `--output runs` every run);
- an existing non-empty target without lora_ft's mark of that kind (its report file) is refused unless the user
  passes --overwrite (`--output ~` would otherwise replace a home directory);
- an earlier output of the same kind is replaced whole: the new one is written beside it, then swapped in.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator, Union

from .errors import LoraFtError

# A folder's mark is the name of the report file lora_ft writes into it; a file's is a test of its content.
Mark = Union[str, Callable[[Path], bool]]


def _is_ours(out: Path, mark: Mark) -> bool:
    if callable(mark):
        return mark(out)
    return (out / mark).is_file()


def check_output(out: Path, mark: Mark, *, sources: Iterable[Path] = (), overwrite: bool = False,
                 what: str = "--output", folder: bool = True) -> None:
    """Raise LoraFtError if writing `out` could destroy a source or something lora_ft did not write."""
    o = Path(out).expanduser().resolve()
    for src in sources:
        s = Path(src).expanduser().resolve()
        if o == s or s in o.parents or o in s.parents:
            raise LoraFtError(f"{what} {out} overlaps the source {src} (it is, holds or sits inside it); "
                              "choose a separate path")
    if not (out.exists() or out.is_symlink()):
        return
    if folder and out.is_dir() and not any(out.iterdir()):
        return
    if folder and out.is_dir() and _is_ours(out, mark):
        return
    if not folder and out.is_file() and _is_ours(out, mark):
        return
    if overwrite:
        return
    if folder and not out.is_dir():
        found = "is a file"
    elif not folder and out.is_dir():
        raise LoraFtError(f"{what} {out} is a folder; give a file name")
    else:
        found = f"exists and was not written by lora_ft (no {mark})" if isinstance(mark, str) else "exists and was not written by lora_ft"
    raise LoraFtError(f"{what} {out} {found}; choose a new path, or pass --overwrite to replace it")


def _swap_in(tmp: Path, out: Path) -> None:
    """Move `tmp` to `out`; an old `out` is moved aside first and deleted only once the new one is in place."""
    if out.exists() or out.is_symlink():
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}-old-", dir=out.parent))
        os.replace(out, trash / "old")
        os.replace(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, out)


def _folder_beside(out: Path) -> Path:
    """A new folder next to `out` with the permissions a plain mkdir gives (mkdtemp's are owner-only, and the folder
    is renamed into place: a merged model must stay readable by a server running as another user)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    return tmp


@contextmanager
def output_dir(out: str | os.PathLike, mark: str, *, sources: Iterable[Path] = (), overwrite: bool = False,
               what: str = "--output") -> Iterator[Path]:
    """Yield a fresh folder beside `out` to write into; on a clean exit it replaces `out`, on an error it goes."""
    out = Path(out)
    check_output(out, mark, sources=list(sources), overwrite=overwrite, what=what)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Beside the output: the same filesystem, so the final rename is atomic.
    tmp = _folder_beside(out)
    try:
        yield tmp
        _swap_in(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def output_file(out: str | os.PathLike, mark: Callable[[Path], bool], *, sources: Iterable[Path] = (),
                overwrite: bool = False, what: str = "--output") -> Iterator[Path]:
    """Yield a path in a private folder beside `out` to write the file to; on a clean exit it replaces `out`."""
    out = Path(out)
    check_output(out, mark, sources=list(sources), overwrite=overwrite, what=what, folder=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        yield tmp / out.name
        if (tmp / out.name).exists():
            _swap_in(tmp / out.name, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def marked(mark: bytes, within: int = 1024) -> Callable[[Path], bool]:
    """A file mark: `mark` (a signature lora_ft writes near the top of its own files) in the first `within` bytes."""
    def test(path: Path) -> bool:
        try:
            with open(path, "rb") as fh:
                return mark in fh.read(within)
        except OSError:
            return False
    return test


def png_by_lora_ft(path: Path) -> bool:
    """PNGs lora_ft saves carry Software=lora_ft in their text chunks (see PNG_METADATA)."""
    try:
        head = path.read_bytes()[:4096]
    except OSError:
        return False
    return head.startswith(b"\x89PNG") and b"Software\x00lora_ft" in head


PNG_METADATA = {"Software": "lora_ft"}
