"""Ranking report: rich tables on the console and ranking, correlation, tier and bootstrap files.

Usage::

    python -m bob_jax.report --workdir DIR [--workdir DIR2 ...] [--pool FILE ...] [--bench bench.json ...]
        [--out DIR] [--min_backbones 3] [--bootstrap 1000] [--seed 0]

reads every record under each ``DIR/results`` (:class:`bob_jax.results.ResultsStore`) and every pool file
(published numbers, CSV or JSON lines; the format is described in :mod:`bob_jax.analysis`), ranks all
backbones together with :func:`bob_jax.ranking.rank_backbones` and writes to ``--out`` (default: the first
``DIR/report``; required when only pool files are given):

* ``ranking.{csv,md,png,json}``: the ranking with overall / per-task z, raw primary metrics, cost
  (parameters, analytic GFLOPs per image, and with ``--bench`` the measured forward img/s per device,
  :mod:`bob_jax.costs`), the pool (backbones and settings standardised together, where the records came
  from) and the weighting; the PNG shows the overall z with bootstrap error bars where available;
* ``pareto.{csv,png}`` (when a scored backbone has a known cost): overall z against GFLOPs and against each
  device's img/s, with the Pareto front (no other backbone scores higher at lower cost) drawn, flagged in the
  CSV and listed in ``ranking.md``;
* ``correlations.{csv,md,png}`` (two or more tasks): cross-task Spearman correlation of per-task mean z;
* ``small_backbones.csv`` and ``params.png`` (when parameter counts are known): the < 30 M tier and overall
  z against parameter count;
* ``bootstrap.csv`` (when records carry ``metrics_per_example``): 95 % percentile intervals for every value,
  z, task z, overall z and rank, from resampling test examples (:func:`bob_jax.analysis.bootstrap_ranking`).

The main job calls :func:`write_report` directly. Every output is written atomically, so a report being
refreshed by one job while another reads it is never seen half-written. Files from an earlier report that
no longer apply (e.g. ``bootstrap.csv``) are removed, so a report directory never mixes two pools.

The command line uses absl's ``argparse_flags`` parser under ``absl.app.run`` rather than module-level
``flags.DEFINE_*``: ``bob_jax.main`` defines its own ``--workdir`` flag and imports this module, and two
absl definitions of one flag name would collide at import time.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
import sys
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bob_jax.analysis import (
    SMALL_PARAMS,
    BootstrapResult,
    Correlations,
    bootstrap_ranking,
    load_pool,
    param_counts,
    small_backbones,
    spearman,
    task_correlations,
)
from bob_jax.costs import (
    Gflops,
    Throughput,
    arch_names,
    gflops_per_backbone,
    load_bench,
    match_throughput,
    pareto_front,
)
from bob_jax.ranking import Ranking, rank_backbones
from bob_jax.results import ResultsStore, atomic_write_bytes, atomic_write_text

__all__ = [
    "FIGURE_DPI",
    "Analysis",
    "analyse",
    "figure_size",
    "main",
    "method_statement",
    "pool_statement",
    "print_ranking",
    "write_report",
]

FIGURE_DPI = 100

# Every file write_report may produce; those not produced this time are deleted (stale results).
_OPTIONAL_FILES = (
    "correlations.csv",
    "correlations.md",
    "correlations.png",
    "small_backbones.csv",
    "params.png",
    "bootstrap.csv",
    "pareto.csv",
    "pareto.png",
)


def figure_size(num_backbones: int) -> tuple[float, float]:
    """Bar-chart size in inches: 8 wide, 2 + 0.25 per backbone high (whole pixels at :data:`FIGURE_DPI`)."""
    return 8.0, 2.0 + 0.25 * max(num_backbones, 1)


def _fmt(x: float | None, spec: str = ".3f") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return ""
    return format(x, spec)


def _fmt_raw(x: float | None) -> str:
    return _fmt(x, ".4g")


def _fmt_ci(ci: tuple[float, float] | None, spec: str = ".3f") -> str:
    """``[lo, hi]``, or '-' where no interval exists (records without per-example values)."""
    if ci is None or not all(math.isfinite(v) for v in ci):
        return "-"
    return f"[{format(ci[0], spec)}, {format(ci[1], spec)}]"


def _fmt_params(n: int | None) -> str:
    return "" if n is None else f"{n / 1e6:.1f}M"


def _fmt_gflops(g: Gflops | None) -> str:
    return "" if g is None else _fmt(g.value, ".4g")


def _fmt_img_s(t: Throughput | None) -> str:
    return "" if t is None else _fmt(t.img_s, ".1f")


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


def pool_statement(ranking: Ranking, records: Sequence[Mapping[str, Any]]) -> str:
    """Which backbones were standardised together, and where their records came from."""
    sources = Counter(str(r.get("source", "results store")) for r in records)
    names = ranking.ranked
    text = (
        f"Pool: {len(names)} backbone(s) standardised together ({', '.join(names)}) in "
        f"{len(ranking.scored_settings)} scored setting(s); each setting's z-scores use only the backbones "
        "evaluated in it (listed in the settings table). Records: "
        + ", ".join(f"{n} from {src}" for src, n in sorted(sources.items()))
    )
    return text + "."


def _sizes_text(g: Gflops) -> str:
    return ", ".join(f"{'unknown size' if s is None else f'{s} px'} x{n}" for s, n in g.sizes.items())


def cost_statement(a: Analysis) -> str:
    """What the cost columns mean: the GFLOPs convention and input sizes, the device behind every img/s."""
    text = (
        "Cost: num_params counts the trainable parameters of the backbone as evaluated; gflops is its "
        "forward GFLOPs per image (2 x the multiply-accumulates of convolutions, linear layers and attention "
        "matmuls, the timm/fvcore convention of bob_jax.bench.flops; a record's own gflops, else computed "
        "from its backbone_name and input_size) at the backbone's most common input size among its records"
    )
    if a.gflops:
        by_size = Counter(g.input_size for g in a.gflops.values())
        text += " (" + ", ".join(
            f"{n} backbone(s) at {'an unknown size' if s is None else f'{s} px'}"
            for s, n in sorted(by_size.items(), key=lambda kv: (kv[0] is None, kv[0] or 0))
        ) + ")"
        mixed = [(b, g) for b, g in a.gflops.items() if g.mixed_sizes]
        if mixed:
            text += "; records at several sizes: " + "; ".join(
                f"{b} ({_sizes_text(g)}; {g.input_size} px used)" for b, g in mixed
            )
    unknown = [b for b in a.ranking.ranked if b not in a.gflops]
    if unknown:
        text += "; unknown (no gflops, or no input_size with a known architecture) for " + ", ".join(unknown)
    text += ". "
    if a.throughput:
        parts = []
        for label, rows in a.throughput.items():
            t = next(iter(rows.values()))
            files = sorted({r.source for r in rows.values()})
            parts.append(f"{label} is the forward throughput of the bob_jax (JAX) model measured by "
                         f"python -m bob_jax.bench on {t.device} in {t.dtype} (from {', '.join(files)}; "
                         "batch and size per backbone in the cost table)")
        text += "; ".join(parts) + "."
    else:
        text += "No measured throughput (python -m bob_jax.report --bench bench.json adds img/s per device)."
    return text


# ----------------------------------------------------------------------------------------------------------
# Everything a report shows, computed once
# ----------------------------------------------------------------------------------------------------------


class ParetoPanel:
    """Overall z against one cost (backbone -> value) over the scored backbones with that cost known."""

    def __init__(self, name: str, label: str, score: Mapping[str, float], cost: Mapping[str, float], *,
                 higher_cost_is_better: bool):
        self.name, self.label = name, label  # CSV column, axis label
        self.backbones = list(cost)
        self.score, self.cost = dict(score), dict(cost)
        self.higher_cost_is_better = higher_cost_is_better
        mask = pareto_front([score[b] for b in self.backbones], [cost[b] for b in self.backbones],
                            higher_cost_is_better=higher_cost_is_better)
        self.on_front = dict(zip(self.backbones, (bool(m) for m in mask), strict=True))
        sign = -1.0 if higher_cost_is_better else 1.0
        # Front members from the cheapest (lowest GFLOPs / highest img/s) to the best scoring.
        self.front = sorted((b for b in self.backbones if self.on_front[b]),
                            key=lambda b: (sign * self.cost[b], -self.score[b], b))


class Analysis:
    """The ranking plus the analyses of :mod:`bob_jax.analysis` and :mod:`bob_jax.costs` for one set of
    records (``throughput``: measurements from :func:`bob_jax.costs.load_bench`)."""

    def __init__(
        self,
        records: Sequence[Mapping[str, Any]],
        *,
        min_backbones: int = 3,
        bootstrap_resamples: int = 1000,
        seed: int = 0,
        small_threshold: int = SMALL_PARAMS,
        throughput: Sequence[Throughput] = (),
    ):
        self.records = list(records)
        self.ranking = rank_backbones(self.records, min_backbones=min_backbones)
        self.params = param_counts(self.records)
        self.gflops, self.cost_notes = gflops_per_backbone(self.records)
        matched = match_throughput(
            arch_names(self.records), list(throughput), {b: g.input_size for b, g in self.gflops.items()}
        )
        # label "img/s [device, dtype]" -> backbone -> measurement; a device matching no backbone is noted.
        self.throughput = {label: rows for label, rows in matched.items() if rows}
        self.cost_notes += [f"No backbone of this report was benchmarked for {label}; column left out."
                            for label, rows in matched.items() if not rows]
        self.pareto = self._pareto_panels()
        self.small_threshold = small_threshold
        self.small = small_backbones(self.ranking, self.params, small_threshold)
        self.correlations: Correlations | None = (
            task_correlations(self.ranking) if len(self.ranking.tasks) >= 2 else None
        )
        if self.correlations is not None and len(self.correlations.tasks) < 2:
            self.correlations = None
        self.bootstrap: BootstrapResult | None = None
        if bootstrap_resamples > 0 and any(r.get("metrics_per_example") is not None for r in self.records):
            self.bootstrap = bootstrap_ranking(
                self.records, num_resamples=bootstrap_resamples, seed=seed, ranking=self.ranking, strict=False
            )

    @property
    def scored(self) -> list[str]:
        return [b for b in self.ranking.ranked if self.ranking.overall_z[b] is not None]

    def _pareto_panels(self) -> list[ParetoPanel]:
        z = self.ranking.overall_z
        panels = []
        gflops = {b: self.gflops[b].value for b in self.scored if b in self.gflops}
        if gflops:
            panels.append(ParetoPanel("gflops", "GFLOPs per image (analytic, log scale)", z, gflops,
                                      higher_cost_is_better=False))
        for label, rows in self.throughput.items():
            img_s = {b: rows[b].img_s for b in self.scored if b in rows}
            if img_s:
                panels.append(ParetoPanel(label, f"forward {label} (measured, log scale)", z, img_s,
                                          higher_cost_is_better=True))
        return panels

    def params_rho(self) -> tuple[float, int]:
        """Spearman rho of overall z vs parameter count over scored backbones with a known count."""
        bbs = [b for b in self.scored if b in self.params]
        if len(bbs) < 2:
            return float("nan"), len(bbs)
        return spearman([self.params[b] for b in bbs], [self.ranking.overall_z[b] for b in bbs]), len(bbs)

    def as_dict(self) -> dict[str, Any]:
        out = self.ranking.as_dict()
        out["pool_statement"] = pool_statement(self.ranking, self.records)
        out["method_statement"] = method_statement(self.ranking)
        out["num_params"] = dict(self.params)
        out["gflops"] = {
            b: {**dataclasses.asdict(g), "sizes": {str(k or "unknown"): n for k, n in g.sizes.items()}}
            for b, g in self.gflops.items()
        }
        out["throughput"] = {
            label: {b: dataclasses.asdict(t) for b, t in rows.items()}
            for label, rows in self.throughput.items()
        }
        out["pareto"] = {p.name: p.front for p in self.pareto}
        out["cost_statement"] = cost_statement(self)
        out["small_backbones"] = {"threshold": self.small_threshold, "ranked": list(self.small)}
        if self.correlations is not None:
            c = self.correlations
            out["task_correlations"] = {
                "tasks": c.tasks,
                "spearman": [[None if not math.isfinite(v) else float(v) for v in row] for row in c.rho],
                "num_backbones": c.n.tolist(),
            }
        out["bootstrap"] = None if self.bootstrap is None else self.bootstrap.as_dict()
        return out


def analyse(records: Iterable[Mapping[str, Any]], **kwargs) -> Analysis:
    """:class:`Analysis` of ``records`` (keyword arguments as its constructor)."""
    return Analysis(list(records), **kwargs)


# ----------------------------------------------------------------------------------------------------------
# Table content shared by the console, CSV and Markdown outputs
# ----------------------------------------------------------------------------------------------------------


def _n_rank_cols(a: Analysis) -> int:
    return 8 + len(a.throughput) + len(a.ranking.tasks)


def _rows(a: Analysis, *, ci_cells: bool) -> tuple[list[str], list[list[str]]]:
    """Header and rows: rank, backbone, overall z (+CI), rank CI, params, GFLOPs, img/s per device, #settings,
    z per task, raw values.

    With ``ci_cells`` the task-z and raw cells also show their interval (Markdown / console); the CSV keeps
    plain numbers there (intervals are in ``bootstrap.csv``).
    """
    ranking, boot = a.ranking, a.bootstrap
    header = ["rank", "backbone", "overall_z", "overall_z_ci", "rank_ci", "num_params", "gflops"]
    header += [*a.throughput, "num_settings"]
    header += [f"z:{t}" for t in ranking.tasks]
    header += [s.setting.label for s in ranking.settings]
    rows = []
    for i, b in enumerate(ranking.ranked, start=1):
        overall = ranking.overall_z[b]
        row = [
            str(i) if overall is not None else "",
            b,
            _fmt(overall),
            _fmt_ci(boot.overall_z.get(b) if boot else None),
            _fmt_ci(boot.rank.get(b) if boot else None, ".0f"),
            _fmt_params(a.params.get(b)),
            _fmt_gflops(a.gflops.get(b)),
            *(_fmt_img_s(rows.get(b)) for rows in a.throughput.values()),
            str(ranking.num_settings[b]),
        ]
        for t in ranking.tasks:
            cell = _fmt(ranking.task_z[b].get(t))
            if ci_cells and boot and t in boot.task_z.get(b, {}):
                cell += " " + _fmt_ci(boot.task_z[b][t])
            row.append(cell)
        for s in ranking.settings:
            cell = _fmt_raw(s.values.get(b))
            if ci_cells and boot and b in boot.value.get(s.setting.label, {}):
                cell += " " + _fmt_ci(boot.value[s.setting.label][b], ".4g")
            row.append(cell)
        rows.append(row)
    return header, rows


def _console() -> Any:
    from rich.console import Console

    return Console(soft_wrap=True, width=None if sys.stdout.isatty() else 240)


def print_ranking(analysis: Analysis, console=None) -> None:
    """Print the ranking to a rich console (default: stdout, 240 columns wide when not a terminal).

    Tables keep it readable at any number of settings: the ranking (overall and per-task z), then the raw
    primary metric per setting with short column ids (S1, S2, ...) explained in a legend, then the small tier
    and the cross-task correlations when available.
    """
    from rich.markup import escape
    from rich.table import Table

    if not isinstance(analysis, Analysis):
        raise TypeError(
            f"print_ranking needs an Analysis (bob_jax.report.analyse(records)), got {type(analysis)}."
        )
    a = analysis
    ranking = a.ranking
    if console is None:
        console = _console()
    header, rows = _rows(a, ci_cells=True)
    n_rank_cols = _n_rank_cols(a)

    table = Table(title="Battle of the Backbones ranking (mean z-score)")
    for j, name in enumerate(header[:n_rank_cols]):
        table.add_column(escape(name), justify="left" if j == 1 else "right", no_wrap=True)
    for row in rows:
        table.add_row(*(escape(c) for c in row[:n_rank_cols]))
    console.print(table)
    for line in [cost_statement(a), *_pareto_lines(a), *a.cost_notes]:
        console.print(line, style="dim", markup=False, highlight=False)

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
    if a.small:
        small = Table(title=f"Small backbones (< {a.small_threshold / 1e6:g}M parameters, full-pool z)")
        for name in ("rank", "backbone", "params", "overall_z"):
            small.add_column(name, justify="left" if name == "backbone" else "right", no_wrap=True)
        for i, b in enumerate(a.small, start=1):
            small.add_row(str(i), escape(b), _fmt_params(a.params[b]), _fmt(ranking.overall_z[b]))
        console.print(small)
    if a.correlations is not None:
        c = a.correlations
        corr = Table(title="Cross-task Spearman correlation of per-task mean z (n backbones)")
        corr.add_column("task", no_wrap=True)
        for t in c.tasks:
            corr.add_column(escape(t), justify="right", no_wrap=True)
        for i, t in enumerate(c.tasks):
            corr.add_row(escape(t), *(_corr_cell(c, i, j) for j in range(len(c.tasks))))
        console.print(corr)
    console.print(pool_statement(ranking, a.records), style="dim", markup=False, highlight=False)
    console.print(method_statement(ranking), style="dim", markup=False, highlight=False)
    if a.bootstrap is not None:
        console.print(_bootstrap_statement(a.bootstrap), style="dim", markup=False, highlight=False)


def _corr_cell(c: Correlations, i: int, j: int) -> str:
    return f"{_fmt(float(c.rho[i, j]), '.2f') or 'n/a'} ({c.n[i, j]})"


def _bootstrap_statement(boot: BootstrapResult) -> str:
    return (
        f"Intervals: {100 * boot.level:g}% bootstrap percentile intervals from {boot.num_resamples} "
        f"resamples (seed {boot.seed}) of the test examples within each record (metrics_per_example); "
        "every value, z-score, task mean, overall score and rank is recomputed per resample. '-' marks "
        "backbones with a record lacking per-example values (held fixed, so no interval is claimed); only "
        "test-set noise is covered, not training seeds."
    )


def _csv(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
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


def _correlation_md(c: Correlations) -> list[str]:
    header = ["task", *c.tasks]
    rows = [[t, *(_corr_cell(c, i, j) for j in range(len(c.tasks)))] for i, t in enumerate(c.tasks)]
    return _md_table(header, rows, right=range(1, len(header)))


def _markdown(a: Analysis) -> str:
    ranking = a.ranking
    header, rows = _rows(a, ci_cells=True)
    n_rank_cols = _n_rank_cols(a)
    lines = ["# Battle of the Backbones ranking", ""]
    lines += [pool_statement(ranking, a.records), "", method_statement(ranking), ""]
    if a.bootstrap is not None:
        lines += [_bootstrap_statement(a.bootstrap), ""]
    lines += ["## Ranking", ""]
    lines += _md_table(
        header[:n_rank_cols], [r[:n_rank_cols] for r in rows], right=[0, *range(2, n_rank_cols)]
    )
    lines += ["", cost_statement(a), ""]
    lines += _cost_md(a)
    lines += ["", f"## Small backbones (< {a.small_threshold / 1e6:g}M parameters)", ""]
    if a.small:
        lines += [
            "Ranked by their overall z from the full pool above (the tier filters the ranking, it does not "
            "re-standardise).",
            "",
        ]
        lines += _md_table(
            ["rank", "backbone", "params", "overall_z", "overall_z_ci"],
            [
                [
                    str(i),
                    b,
                    _fmt_params(a.params[b]),
                    _fmt(ranking.overall_z[b]),
                    _fmt_ci(a.bootstrap.overall_z.get(b) if a.bootstrap else None),
                ]
                for i, b in enumerate(a.small, start=1)
            ],
            right=(0, 2, 3),
        )
    elif a.params:
        lines.append("No scored backbone with a known parameter count is below the threshold.")
    else:
        lines.append("Parameter counts unknown (no record carries num_params).")
    rho, n = a.params_rho()
    if n:
        lines += ["", f"Spearman correlation of overall z with parameter count: {_fmt(rho, '.2f') or 'n/a'} "
                  f"over {n} backbone(s) (see params.png)."]
    if a.correlations is not None:
        lines += ["", "## Cross-task Spearman correlation", ""]
        lines += [
            "Spearman's rho between per-task mean z-scores over the backbones scored in both tasks "
            "(number of backbones in parentheses).",
            "",
        ]
        lines += _correlation_md(a.correlations)
    lines += ["", "## Settings", ""]
    everyone = set(ranking.ranked)
    set_header = ["setting", "direction", "backbones", "mean", "std", "scored", "pool"]
    set_rows = [
        [
            s.setting.label,
            "lower is better" if s.lower_is_better else "higher is better",
            str(len(s.values)),
            _fmt_raw(s.mean),
            _fmt_raw(s.std),
            "yes" if s.scored else f"no ({s.reason})",
            "all backbones" if set(s.values) == everyone else ", ".join(s.values),
        ]
        for s in ranking.settings
    ]
    lines += _md_table(set_header, set_rows, right=(2, 3, 4))
    lines += ["", "## Raw primary metric per setting", ""]
    raw_header = ["backbone", *header[n_rank_cols:]]
    lines += _md_table(raw_header, [[r[1], *r[n_rank_cols:]] for r in rows], right=range(1, len(raw_header)))
    if ranking.skipped:
        lines += ["", "## Records left out", ""] + [f"- {_md_escape(m)}" for m in ranking.skipped]
    if a.bootstrap is not None and a.bootstrap.notes:
        lines += ["", "## Per-example values not used", ""]
        lines += [f"- {_md_escape(m)}" for m in a.bootstrap.notes]
    return "\n".join(lines) + "\n"


_PARETO_SKIPPED = (
    "Pareto plot skipped: no scored backbone has a known cost (records need gflops, or input_size with a "
    "known backbone_name; --bench adds measured throughput)."
)


def _pareto_lines(a: Analysis) -> list[str]:
    """One line per Pareto panel naming its front, cheapest first; the skip message without any panel."""
    if not a.pareto:
        return [_PARETO_SKIPPED]
    lines = []
    for p in a.pareto:
        axis = "GFLOPs" if p.name == "gflops" else p.name
        lines.append(f"Pareto front, overall z vs {axis} ({len(p.front)} of {len(p.backbones)} backbones, "
                     f"cheapest first): " + ", ".join(p.front) + ".")
    return lines


def _cost_md(a: Analysis) -> list[str]:
    """The cost section: per-backbone cost with its input size and benchmark settings, then the fronts."""
    lines = ["## Cost and Pareto front", ""]
    bbs = [b for b in a.ranking.ranked if b in a.gflops or any(b in r for r in a.throughput.values())]
    if bbs:
        header = ["backbone", "overall_z", "params", "input px", "gflops", "gflops from", *a.throughput]
        table = []
        for b in bbs:
            g = a.gflops.get(b)
            row = [b, _fmt(a.ranking.overall_z[b]), _fmt_params(a.params.get(b)),
                   "" if g is None or g.input_size is None else str(g.input_size), _fmt_gflops(g),
                   "" if g is None else g.source]
            for rows in a.throughput.values():
                t = rows.get(b)
                row.append("" if t is None else f"{_fmt_img_s(t)} (batch {t.batch}, {t.size} px, {t.model})")
            table.append(row)
        lines += _md_table(header, table, right=(1, 2, 3, 4, *range(6, len(header))))
        lines.append("")
    pareto = _pareto_lines(a)
    if a.pareto:
        pareto = [f"- {_md_escape(line)}" for line in pareto] + ["", "See pareto.png and pareto.csv."]
    lines += pareto
    if a.cost_notes:
        lines += ["", *(f"- {_md_escape(n)}" for n in a.cost_notes)]
    return lines


def _pareto_csv(a: Analysis) -> str:
    """One row per scored backbone with a cost: overall z, then per cost its value and front membership."""
    bbs = [b for b in a.scored if any(b in p.on_front for p in a.pareto)]
    header = ["backbone", "overall_z", "num_params", "input_size"]
    for p in a.pareto:
        header += [p.name, f"pareto_front:{p.name}"]
    rows = []
    for b in bbs:
        g = a.gflops.get(b)
        row = [b, _fmt(a.ranking.overall_z[b], ".6g"), str(a.params.get(b, "")),
               "" if g is None or g.input_size is None else str(g.input_size)]
        for p in a.pareto:
            if b in p.on_front:
                row += [_fmt(p.cost[b], ".6g"), "yes" if p.on_front[b] else "no"]
            else:
                row += ["", ""]
        rows.append(row)
    return _csv(header, rows)


def _bootstrap_csv(a: Analysis) -> str:
    """Long format: quantity, setting or task, backbone, estimate, lo, hi."""
    boot, ranking = a.bootstrap, a.ranking
    rows = []
    for s in ranking.settings:
        label = s.setting.label
        for b, ci in boot.value.get(label, {}).items():
            rows.append(["value", label, b, _fmt(s.values[b], ".6g"), _fmt(ci[0], ".6g"), _fmt(ci[1], ".6g")])
        for b, ci in boot.z.get(label, {}).items():
            rows.append(["z", label, b, _fmt(s.z[b], ".6g"), _fmt(ci[0], ".6g"), _fmt(ci[1], ".6g")])
    for b in ranking.ranked:
        for t, ci in boot.task_z.get(b, {}).items():
            est = _fmt(ranking.task_z[b][t], ".6g")
            rows.append(["task_z", t, b, est, _fmt(ci[0], ".6g"), _fmt(ci[1], ".6g")])
    for i, b in enumerate(ranking.ranked, start=1):
        if b in boot.overall_z:
            ci = boot.overall_z[b]
            rows.append(["overall_z", "", b, _fmt(ranking.overall_z[b], ".6g"), _fmt(ci[0], ".6g"),
                         _fmt(ci[1], ".6g")])
            lo, hi = boot.rank[b]
            rows.append(["rank", "", b, str(i), f"{lo:g}", f"{hi:g}"])
    return _csv(["quantity", "setting_or_task", "backbone", "estimate", "lo", "hi"], rows)


# ----------------------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------------------


def _figure(size: tuple[float, float]):
    # Agg canvas attached to a bare Figure: renders without a display and without touching pyplot's global
    # backend or figure registry, so repeated reports in one process neither leak figures nor change state.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=FIGURE_DPI)
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    fig.tight_layout()
    buf = io.BytesIO()
    # No bbox_inches="tight": the PNG keeps exactly the figure size * FIGURE_DPI pixels.
    fig.savefig(buf, format="png", dpi=FIGURE_DPI)
    return buf.getvalue()


def _png_bytes(a: Analysis) -> bytes:
    ranking, boot = a.ranking, a.bootstrap
    scored = a.scored
    fig = _figure(figure_size(len(scored)))
    ax = fig.add_subplot()
    if scored:
        ys = list(range(len(scored)))[::-1]  # best at the top
        zs = [ranking.overall_z[b] for b in scored]
        colors = ["tab:blue" if z >= 0 else "tab:red" for z in zs]
        ax.barh(ys, zs, color=colors)
        with_ci = [
            (y, z, boot.overall_z[b]) for y, z, b in zip(ys, zs, scored) if boot and b in boot.overall_z
        ]
        if with_ci:
            # Percentile intervals need not contain the point estimate; clip so errorbar gets no negative arm.
            err = np.array([[max(z - c[0], 0.0), max(c[1] - z, 0.0)] for _, z, c in with_ci]).T
            ax.errorbar([z for _, z, _ in with_ci], [y for y, _, _ in with_ci], xerr=err, fmt="none",
                        ecolor="black", capsize=3, linewidth=1)
        ax.set_yticks(ys, labels=scored, fontsize=8)
        ax.axvline(0.0, color="black", linewidth=0.8)
        label = "mean z-score (equal weight per setting within a task, equal weight per task)"
        if boot is not None and boot.overall_z:
            label += f"; bars: {100 * boot.level:g}% bootstrap CI"
        ax.set_xlabel(label, fontsize=8)
    else:
        ax.text(0.5, 0.5, "no scored settings yet", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    ax.set_title("Battle of the Backbones: overall ranking", fontsize=10)
    return _png(fig)


def _correlation_png(c: Correlations) -> bytes:
    k = len(c.tasks)
    side = 3.0 + 0.8 * k
    fig = _figure((side + 1.0, side))
    ax = fig.add_subplot()
    im = ax.imshow(np.where(np.isfinite(c.rho), c.rho, np.nan), vmin=-1.0, vmax=1.0, cmap="RdBu")
    ax.set_xticks(range(k), labels=c.tasks, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(k), labels=c.tasks, fontsize=8)
    for i in range(k):
        for j in range(k):
            dark = bool(np.isfinite(c.rho[i, j]) and abs(c.rho[i, j]) > 0.6)  # readable on deep colours
            ax.text(j, i, _corr_cell(c, i, j), ha="center", va="center", fontsize=7,
                    color="white" if dark else "black")
    fig.colorbar(im, ax=ax, label="Spearman rho")
    ax.set_title("Cross-task rank correlation (n backbones)", fontsize=10)
    return _png(fig)


def _plain_log_x(ax, xs: Sequence[float]) -> None:
    """Log x axis with plain numbers ("30", not "3 x 10^1"); minor ticks labelled only within a decade,
    where there are too few major ones (over wider ranges their labels would overlap)."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ax.set_xscale("log")
    plain = FuncFormatter(lambda x, _: f"{x:g}")
    ax.xaxis.set_major_formatter(plain)
    narrow = len(xs) > 0 and max(xs) < 10 * min(xs)
    ax.xaxis.set_minor_formatter(plain if narrow else NullFormatter())


def _pareto_png(a: Analysis) -> bytes:
    """One panel per cost: every backbone, the front highlighted and joined as a staircase."""
    fig = _figure((7.0 * len(a.pareto), 6.0))
    for i, p in enumerate(a.pareto, start=1):
        ax = fig.add_subplot(1, len(a.pareto), i)
        xs, ys = [p.cost[b] for b in p.backbones], [p.score[b] for b in p.backbones]
        ax.scatter(xs, ys, color="tab:blue", label="backbone")
        fx, fy = [p.cost[b] for b in p.front], [p.score[b] for b in p.front]
        # The staircase: between two members the best z reachable at that cost is the cheaper member's.
        ax.step(fx, fy, where="post", color="tab:red", linewidth=1)
        ax.scatter(fx, fy, color="tab:red", zorder=3, label="Pareto front")
        for x, y, b in zip(xs, ys, p.backbones, strict=True):
            ax.annotate(b, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        _plain_log_x(ax, xs)
        ax.margins(x=0.2)  # room for the labels of the right-most points
        ax.set_xlabel(p.label + ("; higher is better" if p.higher_cost_is_better else "; lower is better"),
                      fontsize=8)
        ax.set_ylabel("overall mean z-score")
        ax.legend(fontsize=7, loc="best")
        what = "GFLOPs (each backbone at its input size)" if p.name == "gflops" else p.name
        ax.set_title(f"Score vs {what}, n={len(p.backbones)}", fontsize=9)
    return _png(fig)


def _params_png(a: Analysis) -> bytes:
    bbs = [b for b in a.scored if b in a.params]
    fig = _figure((8.0, 6.0))
    ax = fig.add_subplot()
    xs = [a.params[b] / 1e6 for b in bbs]
    ys = [a.ranking.overall_z[b] for b in bbs]
    ax.scatter(xs, ys, color="tab:blue")
    for x, y, b in zip(xs, ys, bbs):
        ax.annotate(b, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.axvline(a.small_threshold / 1e6, color="grey", linestyle="--", linewidth=0.8)
    _plain_log_x(ax, [*xs, a.small_threshold / 1e6])
    ax.margins(x=0.2)  # room for the labels of the right-most points
    ax.set_xlabel("parameters (millions, log scale); dashed: small-tier threshold")
    ax.set_ylabel("overall mean z-score")
    rho, n = a.params_rho()
    ax.set_title(f"Score vs parameter count (Spearman rho {_fmt(rho, '.2f') or 'n/a'}, n={n})", fontsize=10)
    return _png(fig)


# ----------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------


def write_report(
    records: Iterable[Mapping[str, Any]],
    out_dir: str | os.PathLike,
    *,
    min_backbones: int = 3,
    console=None,
    bootstrap_resamples: int = 1000,
    seed: int = 0,
    small_threshold: int = SMALL_PARAMS,
    throughput: Sequence[Throughput] = (),
) -> dict[str, Path]:
    """Rank ``records`` and write the report files (module docstring) atomically into ``out_dir``.

    Returns a dict kind -> path with at least ``csv``, ``md``, ``png`` and ``json`` (the ranking), plus
    ``correlations_{csv,md,png}``, ``small_csv``, ``params_png``, ``bootstrap_csv`` and ``pareto_{csv,png}``
    when they apply. ``bootstrap_resamples=0`` turns the bootstrap off. ``throughput``: measurements from
    :func:`bob_jax.costs.load_bench` (the benchmark harness's bench.json). When ``console`` (a
    ``rich.console.Console``) is given, the tables are printed to it as well.
    """
    import json

    from bob_jax.results import _to_jsonable

    a = Analysis(
        list(records),
        min_backbones=min_backbones,
        bootstrap_resamples=bootstrap_resamples,
        seed=seed,
        small_threshold=small_threshold,
        throughput=throughput,
    )
    out = Path(out_dir)
    header, rows = _rows(a, ci_cells=False)
    paths = {
        "csv": atomic_write_text(out / "ranking.csv", _csv(header, rows)),
        "md": atomic_write_text(out / "ranking.md", _markdown(a)),
        "png": atomic_write_bytes(out / "ranking.png", _png_bytes(a)),
        "json": atomic_write_text(
            out / "ranking.json", json.dumps(_to_jsonable(a.as_dict()), indent=2, sort_keys=True) + "\n"
        ),
    }
    if a.correlations is not None:
        c = a.correlations
        corr_rows = [
            [t, u, _fmt(float(c.rho[i, j]), ".6g"), str(c.n[i, j])]
            for i, t in enumerate(c.tasks)
            for j, u in enumerate(c.tasks)
        ]
        paths["correlations_csv"] = atomic_write_text(
            out / "correlations.csv", _csv(["task_a", "task_b", "spearman_rho", "num_backbones"], corr_rows)
        )
        paths["correlations_md"] = atomic_write_text(
            out / "correlations.md",
            "\n".join(["# Cross-task Spearman correlation", "", *_correlation_md(c)]) + "\n",
        )
        paths["correlations_png"] = atomic_write_bytes(out / "correlations.png", _correlation_png(c))
    if any(b in a.params for b in a.scored):
        small_rows = [
            [str(i), b, str(a.params[b]), _fmt(a.ranking.overall_z[b], ".6g")]
            for i, b in enumerate(a.small, start=1)
        ]
        paths["small_csv"] = atomic_write_text(
            out / "small_backbones.csv", _csv(["rank", "backbone", "num_params", "overall_z"], small_rows)
        )
        paths["params_png"] = atomic_write_bytes(out / "params.png", _params_png(a))
    if a.bootstrap is not None:
        paths["bootstrap_csv"] = atomic_write_text(out / "bootstrap.csv", _bootstrap_csv(a))
    if a.pareto:
        paths["pareto_csv"] = atomic_write_text(out / "pareto.csv", _pareto_csv(a))
        paths["pareto_png"] = atomic_write_bytes(out / "pareto.png", _pareto_png(a))
    written = {p.name for p in paths.values()}
    for name in _OPTIONAL_FILES:
        if name not in written:
            (out / name).unlink(missing_ok=True)
    if console is not None:
        print_ranking(a, console)
    return paths


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------


def _parser():
    from absl.flags import argparse_flags

    p = argparse_flags.ArgumentParser(prog="python -m bob_jax.report", description=__doc__.split("\n")[0])
    p.add_argument(
        "--workdir",
        action="append", default=[],
        help="work directory holding results/<key>.json (repeatable)",
    )
    p.add_argument(
        "--pool",
        action="append", default=[],
        help="pool file of external results, CSV or JSON lines (repeatable)",
    )
    p.add_argument(
        "--bench",
        action="append", default=[],
        help="bench.json of python -m bob_jax.bench: adds measured forward img/s per device (repeatable)",
    )
    p.add_argument("--out", default=None, help="output directory (default: <first workdir>/report)")
    p.add_argument(
        "--min_backbones", type=int, default=3, help="smallest pool that gets z-scored (default 3)"
    )
    p.add_argument(
        "--bootstrap",
        type=int, default=1000,
        help="bootstrap resamples for the intervals (0: off; default 1000)",
    )
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    return p


def _run(args) -> int:
    from rich.console import Console
    from rich.markup import escape

    console = _console()
    errors = Console(stderr=True, soft_wrap=True)
    if not args.workdir and not args.pool:
        errors.print("[red]error:[/red] give at least one --workdir or --pool.")
        return 1
    records: list[dict[str, Any]] = []
    for wd in args.workdir:
        store = ResultsStore(wd)
        if not store.root.is_dir():
            errors.print(
                f"[red]error:[/red] {escape(str(store.root))} does not exist; is --workdir the job's work "
                "directory?"
            )
            return 1
        found = store.records()
        if not found:
            errors.print(f"[red]error:[/red] no readable result records in {escape(str(store.root))}.")
            return 1
        for r in found:
            r.setdefault("source", f"workdir {store.workdir}")
        records += found
    for pool in args.pool:
        try:
            records += load_pool(pool)
        except (OSError, ValueError) as e:
            errors.print(f"[red]error:[/red] {escape(str(e))}")
            return 1
    throughput: list[Throughput] = []
    for bench in args.bench:
        try:
            throughput += load_bench(bench)
        except (OSError, ValueError) as e:
            errors.print(f"[red]error:[/red] {escape(str(e))}")
            return 1
    if args.out:
        out = Path(args.out)
    elif args.workdir:
        out = ResultsStore(args.workdir[0]).workdir / "report"
    else:
        errors.print("[red]error:[/red] with only --pool files, give --out for the report directory.")
        return 1
    try:
        paths = write_report(
            records,
            out,
            min_backbones=args.min_backbones,
            console=console,
            bootstrap_resamples=args.bootstrap,
            seed=args.seed,
            throughput=throughput,
        )
    except ValueError as e:
        errors.print(f"[red]error:[/red] {escape(str(e))}")
        return 1
    for kind, path in paths.items():
        console.print(f"wrote {kind}: {path}", markup=False, highlight=False)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry for programmatic use and tests: ``argv`` without the program name; returns the exit code."""
    return _run(_parser().parse_args(list(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    from absl import app

    app.run(_run, flags_parser=lambda argv: _parser().parse_args(argv[1:]))
