"""`lora-ft compare RUN_A RUN_B ... [--output report.html] [--markdown]`."""

from __future__ import annotations

import argparse

HELP = "compare runs side by side: recipe differences, metrics, speed, memory, loss curves (HTML or Markdown)"


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("compare", help=HELP, description=HELP)
    p.add_argument("runs", nargs="+", metavar="RUN", help="run dirs (a `lora-ft search` folder stands for its trials)")
    p.add_argument("--output", help="write a self-contained HTML report here (.md: Markdown)")
    p.add_argument("--markdown", action="store_true", help="print the Markdown tables to stdout")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output that `lora-ft compare` did not write")
    return p


def run(args, overrides: list[str]) -> int:
    from pathlib import Path

    from ..compare import REPORT_MARK, html_report, load_runs, markdown
    from ..errors import LoraFtError

    if overrides:
        raise LoraFtError(f"compare: unknown option(s) {' '.join(overrides)}; see `lora-ft compare --help`")
    runs = load_runs(args.runs)
    if args.output:
        from ..outputs import marked, output_file

        out = Path(args.output)
        with output_file(out, marked(REPORT_MARK.encode()), sources=[Path(r) for r in args.runs],
                         overwrite=args.overwrite, what="compare: --output") as tmp:
            body = REPORT_MARK + "\n" + markdown(runs) if out.suffix.lower() == ".md" else html_report(runs)
            tmp.write_text(body, encoding="utf-8")
        print(f"wrote {out} ({len(runs)} runs)")
    if args.markdown or not args.output:
        print(markdown(runs), end="")
    return 0
