"""End-to-end tests for bob_jax.report on synthetic result records."""

import csv
import io
import json
import struct

import pytest

from bob_jax import report
from bob_jax.results import ResultsStore


def _records():
    vals = {
        "convnext_base.fb_in22k": (0.85, 0.55, 0.40),
        "swinv2_base.ms_in22k": (0.84, 0.50, 0.38),
        "vit_base_patch16_clip_224.openai": (0.80, 0.52, 0.30),
        "resnet50.tv_in1k": (0.76, 0.40, 0.31),
    }
    out = []
    for b, (lin, ret, det) in vals.items():
        out.append(
            {
                "key": f"{b}-lin".replace("_", "-"),
                "backbone": b,
                "task": "classification",
                "dataset": "cifar100",
                "split": "test",
                "protocol": "linear",
                "metrics": {"top1": lin},
                "primary_metric": "top1",
            }
        )
        out.append(
            {
                "key": f"{b}-ret".replace("_", "-"),
                "backbone": b,
                "task": "retrieval",
                "dataset": "cub200",
                "split": "test",
                "protocol": "class_folder",
                "metrics": {"mAP_revisited": ret, "MRR": 0.9},
                "primary_metric": "mAP_revisited",
            }
        )
        out.append(
            {
                "key": f"{b}-err".replace("_", "-"),
                "backbone": b,
                "task": "ood",
                "dataset": "imagenet_r",
                "split": "test",
                "protocol": "linear",
                "metrics": {"error": 1 - det},
                "primary_metric": "error",
                "lower_is_better": True,
            }
        )
    # a setting with two backbones only: listed, not scored
    out.append(
        {
            "key": "extra-1",
            "backbone": "resnet50.tv_in1k",
            "task": "detection",
            "dataset": "coco",
            "split": "val",
            "protocol": "frozen",
            "metrics": {"AP": 0.3},
            "primary_metric": "AP",
        }
    )
    out.append(
        {
            "key": "extra-2",
            "backbone": "swinv2_base.ms_in22k",
            "task": "detection",
            "dataset": "coco",
            "split": "val",
            "protocol": "frozen",
            "metrics": {"AP": 0.4},
            "primary_metric": "AP",
        }
    )
    return out


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_write_report_end_to_end(tmp_path):
    from rich.console import Console

    console = Console(file=io.StringIO(), width=300)
    paths = report.write_report(_records(), tmp_path / "rep", console=console)
    # four tasks: correlations are written; no num_params / per-example values: no tier, params or bootstrap
    correlations = {"correlations_csv", "correlations_md", "correlations_png"}
    assert set(paths) == {"csv", "md", "png", "json"} | correlations
    for p in paths.values():
        assert p.is_file() and p.parent == tmp_path / "rep"
    assert sorted(x.name for x in (tmp_path / "rep").iterdir()) == [
        "correlations.csv",
        "correlations.md",
        "correlations.png",
        "ranking.csv",
        "ranking.json",
        "ranking.md",
        "ranking.png",
    ]  # no temp files

    rows = list(csv.DictReader(paths["csv"].read_text().splitlines()))
    assert [r["backbone"] for r in rows][0] == "convnext_base.fb_in22k"
    assert [r["rank"] for r in rows] == ["1", "2", "3", "4"]
    zs = [float(r["overall_z"]) for r in rows]
    assert zs == sorted(zs, reverse=True)
    assert {"z:classification", "z:retrieval", "z:ood", "z:detection"} <= set(rows[0])
    assert rows[0]["classification/cifar100/test/linear:top1"] == "0.85"
    assert rows[0]["detection/coco/val/frozen:AP"] == ""  # not evaluated there
    assert rows[0]["z:detection"] == ""  # setting not scored

    md = paths["md"].read_text()
    assert "# Battle of the Backbones ranking" in md
    assert "equal weight per setting within a task, then equal weight per task" in md
    assert "population standard deviation" in md
    assert "Settings scored: 3 of 4" in md and "only 2 backbone(s)" in md
    assert "| 1 | convnext_base.fb_in22k | 1." in md
    assert "Pool: 4 backbone(s) standardised together" in md and "14 from results store" in md
    assert "Parameter counts unknown" in md
    assert "## Cross-task Spearman correlation" in md
    assert rows[0]["overall_z_ci"] == "-" and rows[0]["rank_ci"] == "-"  # no per-example values
    table_lines = [line for line in md.splitlines() if line.startswith("| ") and "fb_in22k" in line]
    assert table_lines

    width, height = _png_size(paths["png"].read_bytes())
    w_in, h_in = report.figure_size(4)
    assert (width, height) == (round(w_in * report.FIGURE_DPI), round(h_in * report.FIGURE_DPI))

    data = json.loads(paths["json"].read_text())
    assert data["ranked"] == [r["backbone"] for r in rows]

    printed = console.file.getvalue()
    assert "convnext_base.fb_in22k" in printed and "overall_z" in printed


def test_main_reads_store(tmp_path, capsys):
    store = ResultsStore(tmp_path)
    for r in _records():
        store.write(r)
    assert report.main(["--workdir", str(tmp_path)]) == 0
    out_dir = tmp_path / "report"
    assert (out_dir / "ranking.md").is_file() and (out_dir / "ranking.png").is_file()
    assert "wrote png" in capsys.readouterr().out
    custom = tmp_path / "elsewhere"
    assert report.main(["--workdir", str(tmp_path), "--out", str(custom), "--min_backbones", "2"]) == 0
    md = (custom / "ranking.md").read_text()
    assert "Settings scored: 4 of 4" in md


def test_main_empty_workdir(tmp_path, capsys):
    assert report.main(["--workdir", str(tmp_path)]) == 1
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "results").mkdir()
    assert report.main(["--workdir", str(tmp_path)]) == 1
    assert "no readable result records" in capsys.readouterr().err


def test_report_without_scored_settings(tmp_path):
    recs = [r for r in _records() if r["task"] == "detection"]
    paths = report.write_report(recs, tmp_path)
    width, height = _png_size(paths["png"].read_bytes())
    assert (width, height) == (800, 225)
    assert "Settings scored: 0 of 1" in paths["md"].read_text()


def test_markdown_escapes_pipes():
    assert report._md_escape("a|b") == "a\\|b"


def test_cli_help_runs():
    with pytest.raises(SystemExit) as e:
        report.main(["--help"])
    assert e.value.code == 0


def _with_per_example(records, n=400, seed=0):
    """Give every classification record 0/1 per-example values whose mean is its accuracy."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for r in records:
        r = dict(r)
        if r["task"] == "classification":
            k = round(r["metrics"]["top1"] * n)
            r["metrics"] = {"top1": k / n}
            r["metrics_per_example"] = rng.permutation([1.0] * k + [0.0] * (n - k)).tolist()
        out.append(r)
    return out


def test_report_with_bootstrap_params_and_stale_files(tmp_path):
    from rich.console import Console

    recs = _with_per_example(_records())
    for r in recs:
        r["num_params"] = 28_000_000 if r["backbone"].startswith("resnet50") else 88_000_000
    console = Console(file=io.StringIO(), width=300)
    paths = report.write_report(recs, tmp_path, bootstrap_resamples=200, console=console)
    assert {"bootstrap_csv", "small_csv", "params_png", "correlations_png"} <= set(paths)

    boot = list(csv.DictReader(paths["bootstrap_csv"].read_text().splitlines()))
    quantities = {r["quantity"] for r in boot}
    assert quantities == {"value", "z", "task_z"}  # overall/rank need every record resampled: none is
    for r in boot:
        assert float(r["lo"]) <= float(r["estimate"]) + 1e-9 and float(r["estimate"]) <= float(r["hi"]) + 1e-9
    md = paths["md"].read_text()
    assert "bootstrap percentile intervals from 200 resamples (seed 0)" in md
    assert "0.85 [" in md  # raw value with its interval
    assert "| 1 | resnet50.tv_in1k | 28.0M |" in md  # small tier table
    small = list(csv.DictReader(paths["small_csv"].read_text().splitlines()))
    assert [r["backbone"] for r in small] == ["resnet50.tv_in1k"] and small[0]["num_params"] == "28000000"
    data = json.loads(paths["json"].read_text())
    assert data["bootstrap"]["num_resamples"] == 200 and data["num_params"]["resnet50.tv_in1k"] == 28_000_000
    assert "Small backbones" in console.file.getvalue()

    # A pool whose records all carry per-example values gets overall and rank intervals, and error bars.
    only_cls = [r for r in recs if r["task"] == "classification"]
    paths = report.write_report(only_cls, tmp_path, bootstrap_resamples=200)
    rows = list(csv.DictReader(paths["csv"].read_text().splitlines()))
    assert all(r["overall_z_ci"].startswith("[") and r["rank_ci"].startswith("[") for r in rows)
    assert not (tmp_path / "correlations.csv").exists()  # stale file from the 4-task report removed
    width, height = _png_size(paths["png"].read_bytes())
    assert (width, height) == (800, 300)

    # Unusable per-example values do not stop the report; they are listed instead.
    bad = [dict(r, metrics_per_example=[0.0, 1.0]) if i == 0 else r for i, r in enumerate(only_cls)]
    md = report.write_report(bad, tmp_path, bootstrap_resamples=50)["md"].read_text()
    assert "## Per-example values not used" in md and "is not the primary metric" in md

    # Bootstrap off and no params: those files go too.
    report.write_report(_records(), tmp_path, bootstrap_resamples=0)
    names = {p.name for p in tmp_path.iterdir()}
    assert not names & {"bootstrap.csv", "params.png", "small_backbones.csv"}


def test_main_merges_workdirs(tmp_path):
    recs = _records()
    first, second = ResultsStore(tmp_path / "w1"), ResultsStore(tmp_path / "w2")
    for r in recs:
        (first if r["backbone"] != "resnet50.tv_in1k" else second).write(r)
    assert report.main(["--workdir", str(tmp_path / "w1"), "--workdir", str(tmp_path / "w2")]) == 0
    data = json.loads((tmp_path / "w1" / "report" / "ranking.json").read_text())
    assert len(data["ranked"]) == 4
    assert "from workdir" in data["pool_statement"] and str(tmp_path / "w2") in data["pool_statement"]


def test_print_ranking_needs_analysis():
    from bob_jax.ranking import rank_backbones

    with pytest.raises(TypeError, match="needs an Analysis"):
        report.print_ranking(rank_backbones(_records()))
