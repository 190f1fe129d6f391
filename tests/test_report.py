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
    assert set(paths) == {"csv", "md", "png", "json"}
    for p in paths.values():
        assert p.is_file() and p.parent == tmp_path / "rep"
    assert sorted(x.name for x in (tmp_path / "rep").iterdir()) == [
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
    assert "| 1 | convnext_base.fb_in22k |" in md
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
