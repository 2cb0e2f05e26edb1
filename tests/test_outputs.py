"""lora_ft.outputs: the one way an output folder or file is written."""

from __future__ import annotations

import pytest

from lora_ft.errors import LoraFtError
from lora_ft.outputs import PNG_METADATA, check_output, marked, output_dir, output_file, png_by_lora_ft

REPORT = "x_report.json"


def _ours(path, text="old"):
    path.mkdir(parents=True, exist_ok=True)
    (path / REPORT).write_text(text)
    return path


@pytest.mark.parametrize("where", ["same", "parent", "inside", "home-like"])
def test_overlapping_the_source_is_refused_even_with_overwrite(tmp_path, where):
    src = tmp_path / "runs" / "x"
    src.mkdir(parents=True)
    (src / "adapter_model.safetensors").write_text("w")
    out = {"same": src, "parent": tmp_path / "runs", "inside": src / "merged", "home-like": tmp_path}[where]
    with pytest.raises(LoraFtError, match="overlaps the source"):
        with output_dir(out, REPORT, sources=[src], overwrite=True):
            pass
    assert (src / "adapter_model.safetensors").read_text() == "w"


def test_foreign_folder_needs_overwrite(tmp_path):
    out = tmp_path / "home"
    out.mkdir()
    (out / "thesis.tex").write_text("mine")
    with pytest.raises(LoraFtError, match=f"not written by lora_ft \\(no {REPORT}\\).*--overwrite"):
        check_output(out, REPORT)
    with output_dir(out, REPORT, overwrite=True) as tmp:
        (tmp / REPORT).write_text("new")
    assert sorted(p.name for p in out.iterdir()) == [REPORT]


def test_earlier_output_is_replaced_whole_and_kept_on_failure(tmp_path):
    out = _ours(tmp_path / "out")
    (out / "stale.bin").write_text("from the last run")
    with pytest.raises(RuntimeError):
        with output_dir(out, REPORT) as tmp:
            (tmp / REPORT).write_text("half")
            raise RuntimeError("verification failed")
    assert (out / REPORT).read_text() == "old" and (out / "stale.bin").exists()
    with output_dir(out, REPORT) as tmp:
        (tmp / REPORT).write_text("new")
    assert sorted(p.name for p in out.iterdir()) == [REPORT] and (out / REPORT).read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp or trash folder left beside it


def test_empty_folder_is_fine(tmp_path):
    (tmp_path / "empty").mkdir()
    with output_dir(tmp_path / "empty", REPORT) as tmp:
        (tmp / REPORT).write_text("new")
    assert (tmp_path / "empty" / REPORT).read_text() == "new"


def test_files_by_mark(tmp_path):
    mark = marked(b"<!-- lora_ft -->")
    out = tmp_path / "report.html"
    out.write_text("my own notes")
    with pytest.raises(LoraFtError, match="not written by lora_ft.*--overwrite"):
        check_output(out, mark, folder=False)
    with output_file(out, mark, overwrite=True) as tmp:
        tmp.write_text("<!-- lora_ft -->one")
    with output_file(out, mark) as tmp:  # ours now: replaced without --overwrite
        tmp.write_text("<!-- lora_ft -->two")
    assert out.read_text() == "<!-- lora_ft -->two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]
    with pytest.raises(LoraFtError, match="is a folder"):
        check_output(tmp_path, mark, folder=False)


def test_png_mark_is_what_matplotlib_writes(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    fig.savefig(tmp_path / "ours.png", format="png", metadata=PNG_METADATA)
    fig.savefig(tmp_path / "theirs.png", format="png")
    plt.close(fig)
    assert png_by_lora_ft(tmp_path / "ours.png") and not png_by_lora_ft(tmp_path / "theirs.png")


def test_written_folders_are_readable_as_a_plain_mkdir_makes_them(tmp_path):
    """mkdtemp makes owner-only folders, and the folder is renamed into place: a server running as another user
    could not read a merged model."""
    import os

    umask = os.umask(0o022)
    try:
        with output_dir(tmp_path / "out", "report.json") as tmp:
            (tmp / "report.json").write_text("{}")
    finally:
        os.umask(umask)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
