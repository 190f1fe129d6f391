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


# ----------------------------------------------------------------------------------------------------------
# Cost beside quality: GFLOPs, measured throughput, Pareto front
# ----------------------------------------------------------------------------------------------------------


def _brute_force_front(score, cost, higher_cost_is_better=False):
    """Point i is dominated when some j is at least as good on both and strictly better on one."""
    import numpy as np

    s, c = np.asarray(score, float), np.asarray(cost, float)
    if higher_cost_is_better:
        c = -c
    no_worse = (s[None, :] >= s[:, None]) & (c[None, :] <= c[:, None])  # [i, j]: j no worse than i
    better = (s[None, :] > s[:, None]) | (c[None, :] < c[:, None])
    return ~(no_worse & better).any(axis=1)


def test_pareto_front_matches_brute_force():
    import numpy as np

    from bob_jax.costs import pareto_front

    rng = np.random.default_rng(0)
    for trial in range(200):
        n = int(rng.integers(1, 25))
        # Few distinct values: many ties in score, in cost and whole duplicate points.
        score = rng.integers(0, 5, n).astype(float) if trial % 2 else rng.normal(size=n)
        cost = rng.integers(1, 5, n).astype(float) if trial % 3 else rng.lognormal(size=n)
        for higher in (False, True):
            got = pareto_front(score, cost, higher_cost_is_better=higher)
            np.testing.assert_array_equal(got, _brute_force_front(score, cost, higher))
    assert pareto_front([1.0, 2.0, 0.5], [1.0, 3.0, 2.0]).tolist() == [True, True, False]
    assert pareto_front([], []).tolist() == []
    with pytest.raises(ValueError, match="finite"):
        pareto_front([1.0, float("nan")], [1.0, 2.0])
    with pytest.raises(ValueError, match="equal length"):
        pareto_front([1.0], [1.0, 2.0])


def _cost_records():
    """Three settings over five zoo backbones with backbone_name / input_size, as bob_jax.battle writes."""
    vals = {
        "vit_base_patch16_224.augreg_in1k": (0.85, 0.55, 0.20),
        "convnext_tiny.fb_in1k": (0.84, 0.50, 0.22),
        "vit_small_patch16_224.augreg_in1k": (0.80, 0.45, 0.25),
        "resnet50.a1_in1k@random": (0.30, 0.10, 0.70),
        "tf_efficientnet_lite0.in1k": (0.70, 0.30, 0.35),
    }
    out = []
    for b, (lin, knn, err) in vals.items():
        for task, value, lower in (("linear_probe", lin, False), ("knn", knn, False), ("shift", err, True)):
            out.append({
                "key": f"{b}-{task}".replace("@", "-"), "backbone": b, "backbone_name": b.partition("@")[0],
                "task": task,
                "dataset": "digits", "split": "train->test", "protocol": "local", "metrics": {"m": value},
                "primary_metric": "m", "lower_is_better": lower, "input_size": 224, "num_params": 5_000_000,
            })
    # One ResNet record at 160 px: the backbone's GFLOPs stay at its most common size (224).
    out[9]["input_size"] = 160
    # The job's own count wins over the analytic one.
    for r in out:
        if r["backbone"].startswith("convnext"):
            r["gflops"] = 9.0
    return out


def test_gflops_per_backbone():
    from bob_jax.bench.flops import analytic_gflops
    from bob_jax.costs import gflops_per_backbone

    recs = _cost_records()
    recs.append(dict(recs[0], key="unknown", backbone="my_net.v1", backbone_name="my_net.v1"))  # unknown arch
    recs.append(dict(recs[0], key="nosize", backbone="no_size", backbone_name="resnet50.a1_in1k",
                     input_size=None))  # a record without input size or gflops has no count
    recs.append(dict(recs[0], key="clip", backbone="resnet50_clip.openai", backbone_name=None,
                     input_size=112))
    g, notes = gflops_per_backbone(recs)
    assert set(g) == {r["backbone"] for r in _cost_records()}
    rn = g["resnet50.a1_in1k@random"]  # label with @weights: the count of its backbone_name
    assert (rn.input_size, rn.source, rn.sizes) == (224, "analytic", {160: 1, 224: 2}) and rn.mixed_sizes
    assert rn.value == analytic_gflops("resnet50.a1_in1k", 224)
    assert (g["convnext_tiny.fb_in1k"].value, g["convnext_tiny.fb_in1k"].source) == (9.0, "record")
    vit = g["vit_base_patch16_224.augreg_in1k"]
    assert round(vit.value, 1) == 35.1 and not vit.mixed_sizes
    # A pool record names only its backbone (the part before '@'); the CLIP ResNet cannot run 112 px.
    assert len(notes) == 1 and "resnet50_clip.openai" in notes[0] and "multiple of 32" in notes[0]
    # Ties between sizes: the smaller size.
    tie = [dict(r, input_size=s) for r, s in zip(_cost_records()[:2], (256, 192), strict=True)]
    assert gflops_per_backbone(tie)[0]["vit_base_patch16_224.augreg_in1k"].input_size == 192
    with pytest.raises(ValueError, match="gflops = -1"):
        gflops_per_backbone([dict(recs[0], gflops=-1)])
    # Pool rows may carry both (CSV strings are parsed); bad values name the row.
    from bob_jax.analysis import pool_records

    row = {"backbone": "b", "task": "t", "dataset": "d", "split": "s", "protocol": "p", "metric": "m",
           "value": "0.5"}
    (rec,) = pool_records([dict(row, gflops="4.5", input_size="224")])
    assert (rec["gflops"], rec["input_size"]) == (4.5, 224)
    with pytest.raises(ValueError, match="row 1: gflops = '0'"):
        pool_records([dict(row, gflops="0")])
    with pytest.raises(ValueError, match="row 1: input_size = '22.5'"):
        pool_records([dict(row, input_size="22.5")])
    with pytest.raises(ValueError, match="input_size = 22.5"):
        gflops_per_backbone([dict(recs[0], input_size=22.5)])


def _write_bench(path, rows, device="NVIDIA H100 80GB HBM3"):
    """A bench.json as the harness writes it (bob_jax.bench.report.write)."""
    from bob_jax.bench import report as bench_report

    result = {"command": "python -m bob_jax.bench ...", "args": {}, "data": None, "convert": None,
              "environment": {"device_kind": device, "platform_name": "gpu", "versions": {"jax": "x"}},
              "models": rows}
    for row in rows:
        bench_report.add_ratios(row)
    json_path, _ = bench_report.write(path, result)
    return json_path


def _bench_row(model, img_s, *, size=224, batch=256, dtype="bfloat16", **extra):
    return {"model": model, "batch": batch, "size": size, "dtype": dtype, "train": False, "params_m": 1.0,
            "gflops_per_img": 1.0, "jax_img_s": img_s, "compile_s": 1.0, **extra}


def test_load_bench_and_match_throughput(tmp_path):
    from bob_jax.costs import load_bench, match_throughput, throughput_label

    path = _write_bench(tmp_path / "h100", [
        _bench_row("vit_base_patch16_224.augreg_in1k", 2000.0),
        _bench_row("vit_base_patch16_224.augreg_in1k", 2600.0, size=160),
        _bench_row("resnet50.tv_in1k", 3000.0),  # another tag: matched by architecture
        _bench_row("resnet50.a1_in1k", 3100.0, batch=64),  # the exact name wins over the larger batch
        _bench_row("convnext_tiny.fb_in1k", None, error="OOM"),  # failed: left out
        {"model": "swin_tiny_patch4_window7_224.ms_in1k", "batch": 8, "size": 224, "jax_train_img_s": 5.0},
        _bench_row("vit_small_patch16_224.augreg_in1k", 900.0, dtype="float32", device="NVIDIA H200"),
    ])
    rows = load_bench(path)
    assert [r.model for r in rows] == ["vit_base_patch16_224.augreg_in1k"] * 2 + [
        "resnet50.tv_in1k", "resnet50.a1_in1k", "vit_small_patch16_224.augreg_in1k"]
    assert rows[0].device == "NVIDIA H100 80GB HBM3" and rows[-1].device == "NVIDIA H200"
    names = {"vit_b": "vit_base_patch16_224.augreg_in1k", "rn": "resnet50.a1_in1k",
             "rn_random": "resnet50.vicreg", "vit_s": "vit_small_patch16_224.augreg_in1k",
             "cn": "convnext_tiny.x"}
    h100 = throughput_label("NVIDIA H100 80GB HBM3", "bfloat16")
    h200 = throughput_label("NVIDIA H200", "float32")
    matched = match_throughput(names, rows, {"vit_b": 224})
    assert list(matched) == [h100, h200]
    assert matched[h100]["vit_b"].img_s == 2000.0  # the row at the backbone's input size
    assert match_throughput(names, rows, {"vit_b": 160})[h100]["vit_b"].img_s == 2600.0
    assert matched[h100]["rn"].img_s == 3100.0
    assert matched[h100]["rn_random"].model == "resnet50.tv_in1k"  # no exact row: the larger batch
    assert set(matched[h100]) == {"vit_b", "rn", "rn_random"} and set(matched[h200]) == {"vit_s"}

    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not JSON"):
        load_bench(bad)
    bad.write_text(json.dumps({"rows": []}))
    with pytest.raises(ValueError, match="no 'models' list"):
        load_bench(bad)
    bad.write_text(json.dumps({"models": [_bench_row("resnet50.a1_in1k", 10.0)]}))
    with pytest.raises(ValueError, match="names no device"):
        load_bench(bad)
    with pytest.raises(FileNotFoundError, match="bench.json"):
        load_bench(tmp_path / "missing.json")


def test_report_cost_columns_and_pareto(tmp_path, capsys):
    import numpy as np

    from bob_jax.bench.flops import analytic_gflops

    recs = _cost_records()
    # Two stores and a pool: the pool's ViT-S rows carry input_size, so its GFLOPs are computed too.
    w1, w2 = ResultsStore(tmp_path / "w1"), ResultsStore(tmp_path / "w2")
    pool_rows = []
    for r in recs:
        if r["backbone"].startswith("vit_small"):
            pool_rows.append({"backbone": r["backbone"], "task": r["task"], "dataset": r["dataset"],
                              "split": r["split"], "protocol": r["protocol"], "metric": "m",
                              "value": r["metrics"]["m"], "lower_is_better": r["lower_is_better"],
                              "input_size": 224})
        else:
            (w1 if r["backbone"].startswith("vit") else w2).write(r)
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps(row) + "\n" for row in pool_rows))
    bench = _write_bench(tmp_path / "bench", [
        _bench_row("vit_base_patch16_224.augreg_in1k", 2000.0), _bench_row("resnet50.a1_in1k", 3000.0),
        _bench_row("tf_efficientnet_lite0.in1k", 9000.0),
    ])
    out = tmp_path / "rep"
    argv = ["--workdir", str(tmp_path / "w1"), "--workdir", str(tmp_path / "w2"), "--pool", str(pool),
            "--bench", str(bench), "--out", str(out), "--bootstrap", "0"]
    assert report.main(argv) == 0
    printed = capsys.readouterr().out
    col = "img/s [NVIDIA H100 80GB HBM3, bfloat16]"
    assert col in printed and "Pareto front, overall z vs GFLOPs" in printed

    rows = {r["backbone"]: r for r in csv.DictReader((out / "ranking.csv").read_text().splitlines())}
    assert len(rows) == 5 and {"num_params", "gflops", col} <= set(next(iter(rows.values())))
    assert rows["vit_small_patch16_224.augreg_in1k"]["gflops"] == format(
        analytic_gflops("vit_small_patch16_224.augreg_in1k", 224), ".4g")
    assert rows["convnext_tiny.fb_in1k"]["gflops"] == "9"  # the record's own count
    assert rows["resnet50.a1_in1k@random"][col] == "3000.0" and rows["convnext_tiny.fb_in1k"][col] == ""

    md = (out / "ranking.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| rank |"))
    assert "| num_params | gflops | " + col + " |" in header
    assert "most common input size among its records" in md
    assert "resnet50.a1_in1k@random (160 px x1, 224 px x2; 224 px used)" in md
    assert "measured by python -m bob_jax.bench on NVIDIA H100 80GB HBM3 in bfloat16" in md
    assert "2000.0 (batch 256, 224 px, vit_base_patch16_224.augreg_in1k)" in md

    # pareto.csv: every scored backbone with a cost, front flags equal to the brute-force check.
    data = json.loads((out / "ranking.json").read_text())
    pareto = list(csv.DictReader((out / "pareto.csv").read_text().splitlines()))
    assert len(pareto) == 5
    z = np.array([data["overall_z"][r["backbone"]] for r in pareto])
    g = np.array([float(r["gflops"]) for r in pareto])
    front = _brute_force_front(z, g)
    assert [r["pareto_front:gflops"] == "yes" for r in pareto] == front.tolist()
    assert sorted(data["pareto"]["gflops"]) == sorted(r["backbone"] for r, f in zip(pareto, front) if f)
    fast = [(r["backbone"], float(r[col])) for r in pareto if r[col]]
    tput_front = _brute_force_front([data["overall_z"][b] for b, _ in fast], [t for _, t in fast], True)
    assert sorted(data["pareto"][col]) == sorted(b for (b, _), f in zip(fast, tput_front) if f)
    for name in data["pareto"]["gflops"]:
        assert name in md.split("Pareto front, overall z vs GFLOPs")[1].split("\n")[0]
    assert data["gflops"]["resnet50.a1_in1k@random"]["sizes"] == {"160": 1, "224": 2}
    width, height = _png_size((out / "pareto.png").read_bytes())
    assert (width, height) == (2 * 7 * report.FIGURE_DPI, 6 * report.FIGURE_DPI)  # GFLOPs and img/s panels

    # Without any cost the Pareto files go (stale ones removed) and the report says why.
    plain = report.write_report(_records(), out, bootstrap_resamples=0)
    assert "pareto_csv" not in plain
    assert not (out / "pareto.png").exists() and not (out / "pareto.csv").exists()
    assert "Pareto plot skipped: no scored backbone has a known cost" in plain["md"].read_text()


def test_cli_bench_errors(tmp_path, capsys):
    store = ResultsStore(tmp_path)
    for r in _cost_records():
        store.write(r)
    assert report.main(["--workdir", str(tmp_path), "--bench", str(tmp_path / "nope.json")]) == 1
    assert "does not exist" in capsys.readouterr().err
    # A benchmark of other backbones only: the column is left out, with a note.
    bench = _write_bench(tmp_path / "b", [_bench_row("swin_tiny_patch4_window7_224.ms_in1k", 50.0)],
                         "TPU v5e")
    assert report.main(["--workdir", str(tmp_path), "--bench", str(bench), "--bootstrap", "0"]) == 0
    md = (tmp_path / "report" / "ranking.md").read_text()
    assert "No backbone of this report was benchmarked for img/s [TPU v5e, bfloat16]" in md
    assert "img/s [TPU v5e" not in md.split("## Ranking")[1].split("\n\n")[1]  # not a column
