"""Ranking report: rich tables on the console and ``ranking.{csv,md,png,json}`` files.

Usage::

    python -m bob_jax.report --workdir DIR [--out DIR] [--min_backbones 3]

reads every record under ``DIR/results`` (:class:`bob_jax.results.ResultsStore`), ranks the backbones with
:func:`bob_jax.ranking.rank_backbones` and writes the files to ``--out`` (default ``DIR/report``). The main
job calls :func:`write_report` directly. Every output is written atomically, so a report being refreshed by
one job while another reads it is never seen half-written.

The command line uses absl's ``argparse_flags`` parser under ``absl.app.run`` rather than module-level
``flags.DEFINE_*``: ``bob_jax.main`` defines its own ``--workdir`` flag and imports this module, and two
absl definitions of one flag name would collide at import time.
"""

from __future__ import annotations

import csv
import io
import math
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from bob_jax.ranking import Ranking, rank_backbones
from bob_jax.results import ResultsStore, atomic_write_bytes, atomic_write_text

__all__ = ["FIGURE_DPI", "figure_size", "main", "method_statement", "print_ranking", "write_report"]

FIGURE_DPI = 100


def figure_size(num_backbones: int) -> tuple[float, float]:
    """Bar-chart size in inches: 8 wide, 2 + 0.25 per backbone high (whole pixels at :data:`FIGURE_DPI`)."""
    return 8.0, 2.0 + 0.25 * max(num_backbones, 1)


def _fmt(x: float | None, spec: str = ".3f") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return ""
    return format(x, spec)


def _fmt_raw(x: float | None) -> str:
    return _fmt(x, ".4g")


def method_statement(ranking: Ranking) -> str:
    """One paragraph stating the z-score pool, the settings included and the weighting."""
    scored = ranking.scored_settings
    unscored = [s for s in ranking.settings if not s.scored]
    text = (
        "z-scores are computed per setting (task, dataset, split, protocol, primary metric) over the "
        "backbones evaluated in that setting, using the mean and population standard deviation (ddof=0) of "
        "their primary metric; lower-is-better metrics are negated so that higher z is always better. "
        f"Settings with fewer than {ranking.min_backbones} backbones or zero spread are listed but not "
        "scored. Weighting: equal weight per setting within a task, then equal weight per task (a backbone "
        "is averaged over the settings and tasks it was evaluated in). "
        f"Settings scored: {len(scored)} of {len(ranking.settings)}"
    )
    if scored:
        text += " (" + ", ".join(s.setting.label for s in scored) + ")"
    if unscored:
        text += "; not scored: " + ", ".join(f"{s.setting.label} [{s.reason}]" for s in unscored)
    return text + "."


# ----------------------------------------------------------------------------------------------------------
# Table content shared by the console, CSV and Markdown outputs
# ----------------------------------------------------------------------------------------------------------


def _rows(ranking: Ranking) -> tuple[list[str], list[list[str]]]:
    """Header and rows: rank, backbone, overall z, #settings, z per task, raw primary metric per setting."""
    header = ["rank", "backbone", "overall_z", "num_settings"]
    header += [f"z:{t}" for t in ranking.tasks]
    header += [s.setting.label for s in ranking.settings]
    rows = []
    for i, b in enumerate(ranking.ranked, start=1):
        overall = ranking.overall_z[b]
        row = [str(i) if overall is not None else "", b, _fmt(overall), str(ranking.num_settings[b])]
        row += [_fmt(ranking.task_z[b].get(t)) for t in ranking.tasks]
        row += [_fmt_raw(s.values.get(b)) for s in ranking.settings]
        rows.append(row)
    return header, rows


def print_ranking(ranking: Ranking, console=None) -> None:
    """Print the ranking to a rich console (default: stdout, 240 columns wide when not a terminal).

    Two tables keep it readable at any number of settings: the ranking (overall and per-task z), then the raw
    primary metric per setting with short column ids (S1, S2, ...) explained in a legend.
    """
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    if console is None:
        console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 240)
    header, rows = _rows(ranking)
    n_rank_cols = 4 + len(ranking.tasks)

    table = Table(title="Battle of the Backbones ranking (mean z-score)")
    for j, name in enumerate(header[:n_rank_cols]):
        table.add_column(escape(name), justify="left" if j == 1 else "right", no_wrap=True)
    for row in rows:
        table.add_row(*(escape(c) for c in row[:n_rank_cols]))
    console.print(table)

    if ranking.settings:
        ids = [f"S{i}" for i in range(1, len(ranking.settings) + 1)]
        raw = Table(title="Raw primary metric per setting")
        raw.add_column("backbone", no_wrap=True)
        for sid in ids:
            raw.add_column(sid, justify="right", no_wrap=True)
        for row in rows:
            raw.add_row(*(escape(c) for c in [row[1], *row[n_rank_cols:]]))
        console.print(raw)
        legend = Table(title="Settings")
        for name in ("id", "setting", "direction", "backbones", "scored"):
            legend.add_column(name, no_wrap=name != "setting")
        for sid, st in zip(ids, ranking.settings, strict=True):
            legend.add_row(
                sid,
                escape(st.setting.label),
                "lower" if st.lower_is_better else "higher",
                str(len(st.values)),
                "yes" if st.scored else escape(f"no ({st.reason})"),
            )
        console.print(legend)
    console.print(method_statement(ranking), style="dim", markup=False, highlight=False)


def _csv_text(ranking: Ranking) -> str:
    header, rows = _rows(ranking)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def _md_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|")


def _md_table(header: Sequence[str], rows: Iterable[Sequence[str]], right: Iterable[int] = ()) -> list[str]:
    """Markdown table; columns whose index is in ``right`` are right-aligned (numbers)."""
    right = set(right)
    lines = ["| " + " | ".join(_md_escape(h) for h in header) + " |"]
    lines.append("|" + "|".join("---:" if j in right else "---" for j in range(len(header))) + "|")
    lines += ["| " + " | ".join(_md_escape(c) for c in row) + " |" for row in rows]
    return lines


def _markdown(ranking: Ranking) -> str:
    header, rows = _rows(ranking)
    n_rank_cols = 4 + len(ranking.tasks)
    lines = ["# Battle of the Backbones ranking", "", method_statement(ranking), "", "## Ranking", ""]
    lines += _md_table(
        header[:n_rank_cols], [r[:n_rank_cols] for r in rows], right=[0, *range(2, n_rank_cols)]
    )
    lines += ["", "## Settings", ""]
    set_header = ["setting", "direction", "backbones", "mean", "std", "scored"]
    set_rows = [
        [
            s.setting.label,
            "lower is better" if s.lower_is_better else "higher is better",
            str(len(s.values)),
            _fmt_raw(s.mean),
            _fmt_raw(s.std),
            "yes" if s.scored else f"no ({s.reason})",
        ]
        for s in ranking.settings
    ]
    lines += _md_table(set_header, set_rows, right=(2, 3, 4))
    lines += ["", "## Raw primary metric per setting", ""]
    raw_header = ["backbone", *header[n_rank_cols:]]
    lines += _md_table(raw_header, [[r[1], *r[n_rank_cols:]] for r in rows], right=range(1, len(raw_header)))
    if ranking.skipped:
        lines += ["", "## Records left out", ""] + [f"- {_md_escape(m)}" for m in ranking.skipped]
    return "\n".join(lines) + "\n"


def _png_bytes(ranking: Ranking) -> bytes:
    # Agg canvas attached to a bare Figure: renders without a display and without touching pyplot's global
    # backend or figure registry, so repeated reports in one process neither leak figures nor change state.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    scored = [b for b in ranking.ranked if ranking.overall_z[b] is not None]
    fig = Figure(figsize=figure_size(len(scored)), dpi=FIGURE_DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if scored:
        ys = list(range(len(scored)))[::-1]  # best at the top
        zs = [ranking.overall_z[b] for b in scored]
        colors = ["tab:blue" if z >= 0 else "tab:red" for z in zs]
        ax.barh(ys, zs, color=colors)
        ax.set_yticks(ys, labels=scored, fontsize=8)
        ax.axvline(0.0, color="black", linewidth=0.8)
        ax.set_xlabel("mean z-score (equal weight per setting within a task, equal weight per task)")
    else:
        ax.text(0.5, 0.5, "no scored settings yet", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    ax.set_title("Battle of the Backbones: overall ranking", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    # No bbox_inches="tight": the PNG keeps exactly figure_size() * FIGURE_DPI pixels.
    fig.savefig(buf, format="png", dpi=FIGURE_DPI)
    return buf.getvalue()


def write_report(
    records: Iterable[Mapping[str, Any]],
    out_dir: str | os.PathLike,
    *,
    min_backbones: int = 3,
    console=None,
) -> dict[str, Path]:
    """Rank ``records`` and write ``ranking.{csv,md,png,json}`` atomically into ``out_dir``.

    Returns ``{"csv": path, "md": path, "png": path, "json": path}``. When ``console`` (a
    ``rich.console.Console``) is given, the table is printed to it as well.
    """
    import json

    from bob_jax.results import _to_jsonable

    ranking = rank_backbones(list(records), min_backbones=min_backbones)
    out = Path(out_dir)
    paths = {
        "csv": atomic_write_text(out / "ranking.csv", _csv_text(ranking)),
        "md": atomic_write_text(out / "ranking.md", _markdown(ranking)),
        "png": atomic_write_bytes(out / "ranking.png", _png_bytes(ranking)),
        "json": atomic_write_text(
            out / "ranking.json", json.dumps(_to_jsonable(ranking.as_dict()), indent=2, sort_keys=True) + "\n"
        ),
    }
    if console is not None:
        print_ranking(ranking, console)
    return paths


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------


def _parser():
    from absl.flags import argparse_flags

    p = argparse_flags.ArgumentParser(prog="python -m bob_jax.report", description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, help="work directory holding results/<key>.json records")
    p.add_argument("--out", default=None, help="output directory (default: <workdir>/report)")
    p.add_argument(
        "--min_backbones", type=int, default=3, help="smallest pool that gets z-scored (default 3)"
    )
    return p


def _run(args) -> int:
    from rich.console import Console
    from rich.markup import escape

    # soft_wrap: paths are printed whole; 240 columns when logging to a file so tables are not folded.
    console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 240)
    errors = Console(stderr=True, soft_wrap=True)
    store = ResultsStore(args.workdir)
    if not store.root.is_dir():
        errors.print(
            f"[red]error:[/red] {escape(str(store.root))} does not exist; is --workdir the job's work "
            "directory?"
        )
        return 1
    records = store.records()
    if not records:
        errors.print(f"[red]error:[/red] no readable result records in {escape(str(store.root))}.")
        return 1
    out = Path(args.out) if args.out else store.workdir / "report"
    paths = write_report(records, out, min_backbones=args.min_backbones, console=console)
    for kind, path in paths.items():
        console.print(f"wrote {kind}: {path}", markup=False, highlight=False)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry for programmatic use and tests: ``argv`` without the program name; returns the exit code."""
    return _run(_parser().parse_args(list(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    from absl import app

    app.run(_run, flags_parser=lambda argv: _parser().parse_args(argv[1:]))
