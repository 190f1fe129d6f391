"""Tests for bob_jax.analysis: pool files, correlations, parameter tiers, count_params and the bootstrap.

The published retrieval MRR table (tests/fixtures/README.md) is ranked through the pool format and checked
against an independent pandas/scipy computation of the per-dataset z-scores (ddof=0) and overall ranking.
"""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from bob_jax import analysis, report
from bob_jax.ranking import rank_backbones

FIXTURE = Path(__file__).parent / "fixtures" / "retrieval_mrr_from_nb_plotting_output.csv"
INSTANCE = ["INSTRE", "google_landmark", "roxford5k", "rparis6k", "Copydays"]  # instance-level retrieval


def _mrr_table() -> pd.DataFrame:
    return pd.read_csv(FIXTURE).set_index("pt_arch")


def _to_pool(table: pd.DataFrame, task_of=lambda dataset: "retrieval") -> pd.DataFrame:
    """The published wide table (backbone x dataset) in the long pool format of bob_jax.analysis."""
    long = table.reset_index().melt(id_vars="pt_arch", var_name="dataset", value_name="value")
    long = long.rename(columns={"pt_arch": "backbone"})
    long["task"] = long["dataset"].map(task_of)
    long["split"] = "test"
    long["protocol"] = "bob_retrieval_nb"
    long["metric"] = "MRR"
    return long[["backbone", "task", "dataset", "split", "protocol", "metric", "value"]]


# ----------------------------------------------------------------------------------------------------------
# The published MRR table against pandas/scipy
# ----------------------------------------------------------------------------------------------------------


def test_published_mrr_table_matches_pandas(tmp_path):
    table = _mrr_table()
    assert table.shape == (33, 8)
    pool_file = tmp_path / "mrr_pool.csv"
    _to_pool(table).to_csv(pool_file, index=False)
    records = analysis.load_pool(pool_file)
    assert len(records) == 33 * 8
    ranking = rank_backbones(records)

    # Independent computation: per-dataset z with the population std, mean over datasets (one task).
    z_ref = (table - table.mean()) / table.std(ddof=0)
    np.testing.assert_allclose(z_ref.to_numpy(), stats.zscore(table.to_numpy(), axis=0, ddof=0), rtol=1e-12)
    overall_ref = z_ref.mean(axis=1)
    assert [s.setting.dataset for s in ranking.settings] == sorted(table.columns)
    for s in ranking.settings:
        assert s.scored and len(s.z) == 33
        for b, z in s.z.items():
            assert z == pytest.approx(z_ref.loc[b, s.setting.dataset], abs=1e-12)
        assert s.std == pytest.approx(table[s.setting.dataset].std(ddof=0), rel=1e-12)
    for b in table.index:
        assert ranking.overall_z[b] == pytest.approx(overall_ref[b], abs=1e-12)
        assert ranking.task_z[b] == {"retrieval": pytest.approx(overall_ref[b], abs=1e-12)}
    expected_order = sorted(table.index, key=lambda b: (-overall_ref[b], b))
    assert ranking.ranked == expected_order
    # scipy's ordinal ranks of the negated scores give the same positions
    positions = stats.rankdata(-overall_ref.to_numpy(), method="ordinal")
    assert [table.index[i] for i in np.argsort(positions)] == expected_order


def test_published_mrr_task_correlation_matches_scipy():
    table = _mrr_table()
    pool = _to_pool(table, lambda d: "instance" if d in INSTANCE else "category")
    records = analysis.pool_records(pool.to_dict("records"))
    ranking = rank_backbones(records)
    corr = analysis.task_correlations(ranking)
    assert corr.tasks == ["category", "instance"]
    z = (table - table.mean()) / table.std(ddof=0)
    inst = z[INSTANCE].mean(axis=1)
    cat = z[[c for c in table.columns if c not in INSTANCE]].mean(axis=1)
    rho_ref = stats.spearmanr(cat, inst).statistic
    assert corr.rho[0, 1] == pytest.approx(rho_ref, abs=1e-12)
    assert corr.rho[1, 0] == corr.rho[0, 1]
    assert np.allclose(np.diag(corr.rho), 1.0)
    assert corr.n.tolist() == [[33, 33], [33, 33]]
    # overall = mean of the two task means (equal weight per task, not per dataset)
    overall_ref = (inst + cat) / 2
    for b in table.index:
        assert ranking.overall_z[b] == pytest.approx(overall_ref[b], abs=1e-12)


def test_new_backbone_ranked_against_published_pool(tmp_path):
    """A bob_jax store record joins the published pool's settings and is ranked with it (the CLI path)."""
    from bob_jax.results import ResultsStore

    table = _mrr_table()
    pool = _to_pool(table)
    pool["num_params"] = ""
    pool.loc[pool["backbone"] == "timm-vit_small_patch16_224_dino", "num_params"] = "21.7e6"
    pool.loc[pool["backbone"] == "timm-convnext_base", "num_params"] = "88.6e6"
    pool_file = tmp_path / "pool.csv"
    pool.to_csv(pool_file, index=False)
    store = ResultsStore(tmp_path / "work")
    best = table.max()
    for ds in table.columns:
        store.write({
            "key": f"new-{ds}", "backbone": "new_backbone", "task": "retrieval", "dataset": ds,
            "split": "test", "protocol": "bob_retrieval_nb", "primary_metric": "MRR",
            "metrics": {"MRR": float(min(1.0, best[ds] + 0.01))}, "num_params": 10_000_000,
        })
    argv = ["--workdir", str(tmp_path / "work"), "--pool", str(pool_file), "--bootstrap", "0"]
    assert report.main(argv) == 0
    out = tmp_path / "work" / "report"
    data = json.loads((out / "ranking.json").read_text())
    assert data["ranked"][0] == "new_backbone"
    assert len(data["ranked"]) == 34
    assert all(len(s["values"]) == 34 for s in data["settings"].values())
    assert data["small_backbones"]["ranked"] == ["new_backbone", "timm-vit_small_patch16_224_dino"]
    md = (out / "ranking.md").read_text()
    assert "Pool: 34 backbone(s) standardised together" in md
    assert f"264 from {pool_file}" in md and "8 from workdir" in md
    assert (out / "params.png").is_file() and (out / "small_backbones.csv").is_file()
    assert not (out / "correlations.csv").exists()  # one task only


# ----------------------------------------------------------------------------------------------------------
# Pool files
# ----------------------------------------------------------------------------------------------------------


def test_pool_jsonl_and_optional_columns(tmp_path):
    rows = [
        {"backbone": "a", "task": "ood", "dataset": "in-r", "split": "test", "protocol": "linear",
         "metric": "error", "value": 0.3, "lower_is_better": True, "num_params": 5e6},
        {"backbone": "b", "task": "ood", "dataset": "in-r", "split": "test", "protocol": "linear",
         "metric": "error", "value": None, "lower_is_better": "true"},
    ]
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    recs = analysis.load_pool(path)
    assert recs[0]["lower_is_better"] is True and recs[0]["num_params"] == 5_000_000
    assert recs[0]["primary_metric"] == "error" and recs[0]["metrics"] == {"error": 0.3}
    assert recs[1]["lower_is_better"] is True and np.isnan(recs[1]["metrics"]["error"])
    assert recs[1]["key"] == f"{path}#2" and "num_params" not in recs[1]
    ranking = rank_backbones(recs, min_backbones=2)
    assert len(ranking.skipped) == 1  # the empty value is listed, not scored


def test_pool_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        analysis.load_pool(tmp_path / "missing.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("backbone,task,dataset,value\na,t,d,1\n")
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['split', 'protocol', 'metric'\]"):
        analysis.load_pool(bad)
    txt = tmp_path / "p.txt"
    txt.write_text("x")
    with pytest.raises(ValueError, match="unknown suffix"):
        analysis.load_pool(txt)
    row = dict(backbone="a", task="t", dataset="d", split="s", protocol="p", metric="m", value="x")
    with pytest.raises(ValueError, match="value = 'x' is not a number"):
        analysis.pool_records([row])
    with pytest.raises(ValueError, match="lower_is_better = 'maybe'"):
        analysis.pool_records([{**row, "value": "1", "lower_is_better": "maybe"}])
    with pytest.raises(ValueError, match="num_params"):
        analysis.pool_records([{**row, "value": "1", "num_params": "-3"}])
    with pytest.raises(ValueError, match=r"column\(s\) \['task'\] are empty"):
        analysis.pool_records([{**row, "value": "1", "task": " "}])
    js = tmp_path / "p.jsonl"
    js.write_text("{not json}\n")
    with pytest.raises(ValueError, match="line 1 is not JSON"):
        analysis.load_pool(js)


def test_cli_pool_only_needs_out(tmp_path, capsys):
    pool = tmp_path / "pool.csv"
    _to_pool(_mrr_table()).to_csv(pool, index=False)
    assert report.main(["--pool", str(pool)]) == 1
    assert "give --out" in capsys.readouterr().err
    assert report.main([]) == 1
    assert "at least one --workdir or --pool" in capsys.readouterr().err
    assert report.main(["--pool", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "o")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert report.main(["--pool", str(pool), "--out", str(tmp_path / "o"), "--bootstrap", "0"]) == 0
    assert (tmp_path / "o" / "ranking.md").is_file()


# ----------------------------------------------------------------------------------------------------------
# Spearman, parameter counts
# ----------------------------------------------------------------------------------------------------------


def test_spearman_matches_scipy_with_ties():
    rng = np.random.default_rng(1)
    for _ in range(5):
        x = rng.integers(0, 5, size=12).astype(float)
        y = x + rng.integers(0, 3, size=12)
        assert analysis.spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    assert np.isnan(analysis.spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))
    assert np.isnan(analysis.spearman([1.0], [2.0]))
    with pytest.raises(ValueError, match="equal length"):
        analysis.spearman([1.0, 2.0], [1.0])


def test_param_counts_and_small_tier():
    recs = [
        {"backbone": "a", "num_params": 25_000_000}, {"backbone": "a", "num_params": 27_000_000},
        {"backbone": "b", "num_params": 86e6}, {"backbone": "c"},
    ]
    assert analysis.param_counts(recs) == {"a": 25_000_000, "b": 86_000_000}
    with pytest.raises(ValueError, match="not a positive number"):
        analysis.param_counts([{"backbone": "a", "num_params": "many"}])


def test_count_params_of_a_backbone():
    from flax import nnx

    from bob_jax import backbones

    # timm's resnet50: sum(p.numel() for p in model.parameters()) == 25,557,032 (BatchNorm stats excluded).
    model = backbones.create("resnet50.a1_in1k", weights=None)
    assert analysis.count_params(model) == 25_557_032

    class Tiny(nnx.Module):
        def __init__(self):
            self.lin = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
            self.bn = nnx.BatchNorm(4, rngs=nnx.Rngs(0))

    assert analysis.count_params(Tiny()) == 3 * 4 + 4 + 4 + 4  # kernel, bias, BN scale and bias only


# ----------------------------------------------------------------------------------------------------------
# Bootstrap
# ----------------------------------------------------------------------------------------------------------


def _rec(backbone, dataset, per_example=None, value=None, task="cls", lower=False):
    if per_example is not None:
        per_example = [float(v) for v in per_example]
        value = float(np.mean(per_example))
    rec = {
        "key": f"{backbone}-{dataset}", "backbone": backbone, "task": task, "dataset": dataset,
        "split": "test", "protocol": "linear", "metrics": {"acc": value}, "primary_metric": "acc",
        "lower_is_better": lower,
    }
    if per_example is not None:
        rec["metrics_per_example"] = per_example
    return rec


def _correct(n, acc, rng):
    """n 0/1 values with exactly round(acc * n) ones, shuffled."""
    k = int(round(acc * n))
    return rng.permutation(np.r_[np.ones(k), np.zeros(n - k)])


def test_bootstrap_deterministic_case():
    """Constant per-example values: every replicate equals the point estimate, so intervals collapse."""
    recs = [_rec(b, "d", np.full(50, v)) for b, v in [("a", 0.2), ("b", 0.5), ("c", 0.9)]]
    recs += [_rec(b, "e", np.full(20, v), task="ret") for b, v in [("a", 0.1), ("b", 0.7), ("c", 0.6)]]
    ranking = rank_backbones(recs)
    boot = analysis.bootstrap_ranking(recs, num_resamples=50, ranking=ranking)
    for s in ranking.settings:
        for b in s.values:
            assert boot.value[s.setting.label][b] == pytest.approx((s.values[b],) * 2)
            assert boot.z[s.setting.label][b] == pytest.approx((s.z[b],) * 2)
    for i, b in enumerate(ranking.ranked, start=1):
        assert boot.overall_z[b] == pytest.approx((ranking.overall_z[b],) * 2)
        assert boot.rank[b] == (i, i)
        assert boot.task_z[b] == {t: pytest.approx((z, z)) for t, z in ranking.task_z[b].items()}


def test_bootstrap_width_shrinks_with_n_and_is_seeded():
    rng = np.random.default_rng(0)
    widths = []
    for n in (50, 800):
        recs = [_rec(b, "d", _correct(n, acc, rng)) for b, acc in [("a", 0.5), ("b", 0.6), ("c", 0.8)]]
        boot = analysis.bootstrap_ranking(recs, num_resamples=400, seed=3)
        lo, hi = boot.value["cls/d/test/linear:acc"]["b"]
        assert lo <= 0.6 <= hi
        widths.append(hi - lo)
        # binomial standard error: a 95% interval is about 2 * 1.96 * sqrt(p (1-p) / n) wide
        assert hi - lo == pytest.approx(2 * 1.96 * np.sqrt(0.24 / n), rel=0.25)
        again = analysis.bootstrap_ranking(recs, num_resamples=400, seed=3)
        assert again.as_dict() == boot.as_dict()
        other = analysis.bootstrap_ranking(recs, num_resamples=400, seed=4)
        assert other.value != boot.value
    assert widths[1] < widths[0] / 3  # ~ 1/sqrt(16) = 1/4


def test_bootstrap_ranks_and_mixed_records():
    rng = np.random.default_rng(0)
    recs = [
        _rec("a", "d", _correct(2000, 0.30, rng)),
        _rec("b", "d", _correct(2000, 0.60, rng)),
        _rec("c", "d", _correct(2000, 0.61, rng)),
        _rec("d", "d", value=0.9),  # no per-example values: held fixed, no interval claimed
        _rec("a", "e", _correct(100, 0.5, rng), task="ret", lower=True),
        _rec("b", "e", _correct(100, 0.4, rng), task="ret", lower=True),
        _rec("c", "e", _correct(100, 0.3, rng), task="ret", lower=True),
    ]
    ranking = rank_backbones(recs)
    boot = analysis.bootstrap_ranking(recs, num_resamples=300, seed=0, ranking=ranking)
    assert set(boot.value["cls/d/test/linear:acc"]) == {"a", "b", "c"}
    assert "d" not in boot.overall_z and "d" not in boot.rank and "d" not in boot.task_z
    # a is last in both tasks by far: its rank is certain; b and c are close: their ranks overlap
    assert ranking.ranked[-1] == "a" and boot.rank["a"] == (4, 4)
    assert boot.rank["b"][0] < boot.rank["b"][1] and boot.rank["c"][0] < boot.rank["c"][1]
    for b in "abc":
        lo, hi = boot.overall_z[b]
        assert lo <= ranking.overall_z[b] <= hi
        for t, (tlo, thi) in boot.task_z[b].items():
            assert tlo <= ranking.task_z[b][t] <= thi


def test_bootstrap_errors():
    rec = _rec("a", "d", [1, 0, 1])
    with pytest.raises(ValueError, match="is not the primary metric"):
        analysis.bootstrap_ranking([{**rec, "metrics": {"acc": 66.7}}] + [_rec(b, "d", [1, 0]) for b in "bc"])
    with pytest.raises(ValueError, match="non-empty list of numbers"):
        analysis.bootstrap_ranking([{**rec, "metrics_per_example": [None, float("nan")]}])
    with pytest.raises(ValueError, match="not a list of numbers"):
        analysis.bootstrap_ranking([{**rec, "metrics_per_example": "101"}])
    with pytest.raises(ValueError, match="num_resamples"):
        analysis.bootstrap_ranking([rec], num_resamples=0)


def test_bootstrap_drops_undefined_examples_and_lenient_mode():
    """Null per-example values (retrieval queries without positives) are dropped, as the mean drops them."""
    recs = [_rec(b, "d", value=v) for b, v in [("a", 0.25), ("b", 0.5), ("c", 0.75)]]
    for r, ex in zip(recs, ([0.0, 0.5, None], [0.5, float("nan"), 0.5], [1.0, 0.5, None, 0.75])):
        r["metrics_per_example"] = ex
    boot = analysis.bootstrap_ranking(recs, num_resamples=100)
    assert boot.value["cls/d/test/linear:acc"]["b"] == (0.5, 0.5)
    lo, hi = boot.value["cls/d/test/linear:acc"]["a"]
    assert 0.0 <= lo < 0.25 < hi <= 0.5

    recs[0]["metrics"] = {"acc": 25.0}  # percent, while the per-example values are fractions
    with pytest.raises(ValueError, match="is not the primary metric"):
        analysis.bootstrap_ranking(recs, num_resamples=10)
    lenient = analysis.bootstrap_ranking(recs, num_resamples=10, strict=False)
    assert len(lenient.notes) == 1 and "a-d" in lenient.notes[0]
    assert "a" not in lenient.value["cls/d/test/linear:acc"] and "a" not in lenient.overall_z
    assert "b" in lenient.overall_z


def test_bootstrap_continuous_values_match_standard_error():
    """Many distinct values (per-query AP) take the index-resampling path; its spread is the standard error."""
    rng = np.random.default_rng(5)
    x = rng.random(300)
    means = analysis._resampled_means(x, 2000, np.random.default_rng(0))
    assert np.unique(x).size > 64
    assert means.mean() == pytest.approx(x.mean(), abs=3e-3)
    assert means.std() == pytest.approx(x.std() / np.sqrt(x.size), rel=0.1)
    # the multinomial path for few distinct values has the same spread
    y = (x > 0.5).astype(float)
    fast = analysis._resampled_means(y, 2000, np.random.default_rng(0))
    assert fast.std() == pytest.approx(y.std() / np.sqrt(y.size), rel=0.1)
