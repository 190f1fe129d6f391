"""Retrieval protocols of the original: revisited Oxford/Paris (hand-computed and against an independent
re-implementation of revisitop's compute_map), the class-folder split (BoB's TwoLeveldataset rule on a
generated tree), the revisited source (layout, pickle safety, crops), the retrieval task's protocol glue and
the per-family descriptor choice (class token vs timm's forward_features)."""

import os
import pickle
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from bob_jax import backbones
from bob_jax.data.revisited import RevisitedSource
from bob_jax.data.sources import ImageFolder, Subset, get_source
from bob_jax.evaluate import retrieval as R
from bob_jax.features import Features, class_token
from bob_jax.frozen import TASKS, DataSplits

# ----------------------------------------------------------------------------------------------------------
# Independent oracle: revisitop's compute_map (python/evaluate.py) as a plain loop over the db x nq ranks
# layout, with BoB's additions (recall@k over the junk-free positions, MRR before junk removal / all queries).
# ----------------------------------------------------------------------------------------------------------


def _oracle_ap(positions, num_positives):
    ap = 0.0
    for j, rank in enumerate(positions):
        before = 1.0 if rank == 0 else j / rank
        after = (j + 1) / (rank + 1)
        ap += (before + after) / 2.0 / num_positives
    return ap


def _oracle_compute_map(ranks_db_by_q, gnd, kappas):
    """ranks_db_by_q: [db, nq] (revisitop's layout). Returns mAP, mean P@k, mean R@k, MRR."""
    nq = len(gnd)
    aps, precisions, recalls, mrr = [], [], [], 0.0
    for i in range(nq):
        ok = np.asarray(gnd[i]["ok"])
        if ok.size == 0:
            continue
        junk = np.asarray(gnd[i].get("junk", []))
        column = list(ranks_db_by_q[:, i])
        pos = [r for r, item in enumerate(column) if item in set(ok.tolist())]
        junk_pos = [r for r, item in enumerate(column) if item in set(junk.tolist())]
        mrr += 1.0 / (min(pos) + 1)
        shifted = []
        for p in pos:  # every junk item ranked before a positive is removed from the ranking
            shifted.append(p - sum(1 for jp in junk_pos if jp < p))
        aps.append(_oracle_ap(shifted, ok.size))
        one_based = [p + 1 for p in shifted]
        precisions.append([sum(p <= min(max(one_based), k) for p in one_based) / min(max(one_based), k)
                           for k in kappas])
        recalls.append([sum(p <= k for p in one_based) / ok.size for k in kappas])
    return np.mean(aps), np.mean(precisions, axis=0), np.mean(recalls, axis=0), mrr / nq


def _medium(g):
    return {"ok": np.concatenate([g["easy"], g["hard"]]), "junk": np.asarray(g["junk"])}


def _easy(g):
    return {"ok": np.asarray(g["easy"]), "junk": np.concatenate([g["junk"], g["hard"]])}


def _hard(g):
    return {"ok": np.asarray(g["hard"]), "junk": np.concatenate([g["junk"], g["easy"]])}


ORACLE_GT = {"easy": _easy, "medium": _medium, "hard": _hard}

# Two queries over 8 database items (explicit rankings, one row per query).
HAND_GND = [
    {"easy": np.array([0, 3]), "hard": np.array([5]), "junk": np.array([1]), "bbx": [0, 0, 4, 4]},
    {"easy": np.array([7]), "hard": np.array([], np.int64), "junk": np.array([], np.int64),
     "bbx": [0, 0, 4, 4]},
]
HAND_RANKS = np.array([[1, 0, 2, 3, 4, 5, 6, 7], [7, 6, 5, 4, 3, 2, 1, 0]])


def test_revisited_map_hand_computed():
    got = R.revisited_evaluate(HAND_RANKS, HAND_GND)
    # Query 0, Medium: ok {0, 3, 5} at 0-based positions 1, 3, 5; the junk item 1 sits at 0 and is removed, so
    # the positives move to 0, 2, 4: AP = [ (1 + 1) + (1/2 + 2/3) + (2/4 + 3/5) ] / 2 / 3 = 0.71111.
    ap0_medium = ((1 + 1) + (1 / 2 + 2 / 3) + (2 / 4 + 3 / 5)) / 2 / 3
    # Easy: ok {0, 3}; junk {1, 5} -> positions 0, 2: AP = [(1 + 1) + (1/2 + 2/3)] / 2 / 2.
    ap0_easy = ((1 + 1) + (1 / 2 + 2 / 3)) / 2 / 2
    # Hard: ok {5}; junk {1, 0, 3} all ranked before it -> position 5 - 3 = 2: AP = (0/2 + 1/3) / 2.
    ap0_hard = (0 + 1 / 3) / 2
    # Query 1: its single easy positive is ranked first (AP 1); it has no hard positive (left out of Hard).
    assert got["medium"]["mAP"] == pytest.approx((ap0_medium + 1) / 2, abs=1e-12)
    assert got["easy"]["mAP"] == pytest.approx((ap0_easy + 1) / 2, abs=1e-12)
    assert got["hard"]["mAP"] == pytest.approx(ap0_hard, abs=1e-12)
    # mP@k (revisitop's kappa rule: k_q = min(last positive position, k)); Medium q0 at 1, 3, 5 (1-based).
    assert got["medium"]["P@1"] == pytest.approx(1.0)
    assert got["medium"]["P@5"] == pytest.approx((3 / 5 + 1) / 2)
    assert got["medium"]["P@10"] == pytest.approx((3 / 5 + 1) / 2)
    assert got["easy"]["P@5"] == pytest.approx((2 / 3 + 1) / 2)  # k_q = min(3, 5) = 3
    assert got["hard"]["P@1"] == pytest.approx(0.0)  # k_q = 1, the positive is third
    assert got["hard"]["P@5"] == pytest.approx(1 / 3)
    # MRR before junk removal, divided by every query (BoB): Medium (1/2 + 1) / 2; Hard (1/6 + 0) / 2.
    assert got["medium"]["MRR"] == pytest.approx(0.75)
    assert got["hard"]["MRR"] == pytest.approx(1 / 12)
    for difficulty, to_gt in ORACLE_GT.items():
        m, p, r, mrr = _oracle_compute_map(HAND_RANKS.T, [to_gt(g) for g in HAND_GND], (1, 5, 10))
        assert got[difficulty]["mAP"] == pytest.approx(m, abs=1e-12)
        assert [got[difficulty][f"P@{k}"] for k in (1, 5, 10)] == pytest.approx(p, abs=1e-12)
        assert [got[difficulty][f"R@{k}"] for k in (1, 5, 10)] == pytest.approx(r, abs=1e-12)
        assert got[difficulty]["MRR"] == pytest.approx(mrr, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_revisited_retrieval_matches_oracle_on_random_descriptors(seed):
    rng = np.random.default_rng(seed)
    num_db, num_q, dim = 60, 7, 16
    db, q = rng.standard_normal((num_db, dim)), rng.standard_normal((num_q, dim))
    gnd = []
    for _ in range(num_q):
        items = rng.permutation(num_db)
        gnd.append({"easy": items[:rng.integers(1, 6)], "hard": items[6:6 + rng.integers(1, 5)],
                    "junk": items[12:12 + rng.integers(0, 6)]})
    metrics, per_query = R.revisited_retrieval(q, db, gnd, kappas=(1, 5, 10))
    # The oracle ranks on its own: cosine similarity, revisitop's argsort(-sim, axis=0) (no ties here).
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    dn = db / np.linalg.norm(db, axis=1, keepdims=True)
    ranks = np.argsort(-(dn @ qn.T), axis=0)
    for difficulty, to_gt in ORACLE_GT.items():
        m, p, r, mrr = _oracle_compute_map(ranks, [to_gt(g) for g in gnd], (1, 5, 10))
        assert metrics[f"mAP_{difficulty}"] == pytest.approx(m, abs=1e-12)
        assert [metrics[f"P@{k}_{difficulty}"] for k in (1, 5, 10)] == pytest.approx(p, abs=1e-12)
        assert [metrics[f"R@{k}_{difficulty}"] for k in (1, 5, 10)] == pytest.approx(r, abs=1e-12)
        assert metrics[f"MRR_{difficulty}"] == pytest.approx(mrr, abs=1e-12)
    assert np.nanmean(per_query["AP_medium"]) == pytest.approx(metrics["mAP_medium"])


# ----------------------------------------------------------------------------------------------------------
# Class-folder protocol
# ----------------------------------------------------------------------------------------------------------

# Class sizes around the int(0.2 n) steps: 3 and 4 give no query, 5 -> 1, 9 -> 1, 10 -> 2, 12 -> 2.
CLASS_SIZES = {"cardinal": 12, "albatross": 5, "bunting": 3, "dove": 10, "eagle": 9, "finch": 4}


def _make_tree(root, sizes, seed=0):
    rng = np.random.default_rng(seed)
    for cls, n in sizes.items():
        (root / cls).mkdir(parents=True)
        # Names in no particular creation order, with numbers that sort differently as strings.
        for number in rng.permutation(n) * 7 + 3:
            (root / cls / f"{cls[:3]}_{number}.jpg").write_bytes(b"")


def _two_level_oracle(root, query_fraction=0.2, maxlim=None):
    """BoB's TwoLeveldataset (bob-retrieval retrieval/utils.py): query names, database names, and per query
    the database positions of its positives, read straight from the directory tree."""
    queries, database, ok = [], [], []
    for cls in sorted(os.listdir(root)):
        files = sorted(f for f in os.listdir(root / cls) if f.endswith((".jpg", ".JPG", ".png")))
        if maxlim is not None:
            files = files[:maxlim]
        till = int((len(files) * query_fraction) // 1)
        start = len(database)
        for f in files[:till]:
            queries.append(f"{cls}/{f}")
            ok.append(list(range(start, start + len(files) - till)))
        database.extend(f"{cls}/{f}" for f in files[till:])
    return queries, database, ok


@pytest.mark.parametrize("maxlim", [None, 6])
def test_class_folder_split_matches_two_level_dataset(tmp_path, maxlim):
    _make_tree(tmp_path, CLASS_SIZES)
    source = get_source(f"folder:{tmp_path}", "all")
    names = source.names()
    q_idx, db_idx = R.class_folder_split(names, source.labels(), 0.2, max_per_class=maxlim)
    queries, database, _ = _two_level_oracle(tmp_path, maxlim=maxlim)
    assert [names[i] for i in q_idx] == queries
    assert [names[i] for i in db_idx] == database
    # int(0.2 n): classes of 3 and 4 images give no query; their images stay in the database.
    counts = {cls: sum(n.startswith(f"{cls}/") for n in queries) for cls in CLASS_SIZES}
    if maxlim is None:
        assert counts == {"cardinal": 2, "albatross": 1, "bunting": 0, "dove": 2, "eagle": 1, "finch": 0}
        assert sum(n.startswith("bunting/") for n in database) == 3
    else:  # capped at 6 first: int(1.2) = 1 for every class of 5+ images
        assert counts == {"cardinal": 1, "albatross": 1, "bunting": 0, "dove": 1, "eagle": 1, "finch": 0}
        assert len(database) == sum(min(n, 6) for n in CLASS_SIZES.values()) - 4


def test_class_folder_task_matches_bob_compute_map(tmp_path):
    _make_tree(tmp_path, CLASS_SIZES)
    source = get_source(f"folder:{tmp_path}", "all")
    rng = np.random.default_rng(3)
    # Descriptors that carry some class signal, so the metrics are not trivial.
    centers = rng.standard_normal((len(CLASS_SIZES), 12))
    feats = centers[source.labels()] + 1.5 * rng.standard_normal((len(source), 12))
    test = Features(feats.astype(np.float32), source.labels(), key="t")
    cfg = {"protocol": "class_folder", "ks": (1, 5, 10), "query_fraction": 0.2, "max_per_class": 0,
           "descriptor": "bob"}
    task = TASKS["retrieval"]
    assert not task.train_needed(cfg) and task.primary_for(cfg) == "mAP_revisited"
    metrics, per_query = task.run(None, test, num_classes=source.num_classes, cfg=cfg, mesh=None,
                                  workdir=str(tmp_path), progress=False, sources=DataSplits(None, source))
    queries, database, ok = _two_level_oracle(tmp_path)
    row = {n: i for i, n in enumerate(source.names())}
    q = feats[[row[n] for n in queries]]
    db = feats[[row[n] for n in database]]
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    dn = db / np.linalg.norm(db, axis=1, keepdims=True)
    ranks = np.argsort(-(dn @ qn.T), axis=0, kind="stable")
    m, p, r, mrr = _oracle_compute_map(ranks, [{"ok": o, "junk": []} for o in ok], (1, 5, 10))
    assert metrics["mAP_revisited"] == pytest.approx(m, abs=1e-6)
    assert [metrics[f"P@{k}"] for k in (1, 5, 10)] == pytest.approx(p, abs=1e-6)
    assert [metrics[f"R@{k}"] for k in (1, 5, 10)] == pytest.approx(r, abs=1e-6)
    assert metrics["MRR"] == pytest.approx(mrr, abs=1e-6)
    assert (metrics["num_queries"], metrics["num_database"]) == (len(queries), len(database))
    assert len(per_query) == len(queries)
    # A subset keeps the names of its items; a source without file names is refused by name.
    sub = Subset(source, np.arange(0, len(source), 2))
    assert sub.names() == tuple(source.names()[i] for i in range(0, len(source), 2))
    with pytest.raises(ValueError, match="file names"):
        task.run(None, test, num_classes=2, cfg=cfg, mesh=None, workdir="", progress=False,
                 sources=DataSplits(None, object()))
    with pytest.raises(ValueError, match="no class yields a query"):
        R.class_folder_retrieval(feats[:3], np.array([0, 0, 1]), ["a", "b", "c"])
    with pytest.raises(ValueError, match="retrieval protocol 'bogus'"):
        task.train_needed({**cfg, "protocol": "bogus"})


# ----------------------------------------------------------------------------------------------------------
# Revisited source and task
# ----------------------------------------------------------------------------------------------------------


def _make_revisited(root, name="roxford5k", *, protocol=2, num_db=6, size=(30, 40), seed=0):
    rng = np.random.default_rng(seed)
    folder = root / name
    (folder / "jpg").mkdir(parents=True)
    imlist = [f"all_souls_{i:06d}" for i in range(num_db)]
    qimlist = ["radcliffe_query", "ashmolean_query"]
    for n in imlist + qimlist:
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(folder / "jpg" / f"{n}.jpg")
    gnd = [
        {"easy": np.array([0, 1]), "hard": np.array([2]), "junk": np.array([3]),
         "bbx": np.array([2.4, 3.5, 20.6, 25.5])},
        {"easy": [4], "hard": [], "junk": [5], "bbx": [0.0, 0.0, 10.0, 12.0]},
    ]
    with open(folder / f"gnd_{name}.pkl", "wb") as f:
        pickle.dump({"imlist": imlist, "qimlist": qimlist, "gnd": gnd}, f, protocol=protocol)
    return imlist, qimlist, gnd


@pytest.mark.parametrize("protocol", [2, 5])
def test_revisited_source_layout_crop_and_thumbnail(tmp_path, protocol):
    imlist, qimlist, _ = _make_revisited(tmp_path, protocol=protocol, size=(300, 400))
    bob = get_source("revisited:roxford5k", "bob", data_dir=tmp_path)
    assert len(bob) == 8 and bob.num_database == 6 and bob.num_queries == 2
    assert bob.names() == (*imlist, *qimlist)
    np.testing.assert_array_equal(bob.labels(), [0] * 6 + [1] * 2)
    np.testing.assert_array_equal(bob.gnd[0]["easy"], [0, 1])
    assert bob.gnd[1]["hard"].dtype == np.int64 and bob.gnd[1]["hard"].size == 0
    # BoB: every image shrunk to fit 224 x 224 (aspect kept), queries whole.
    assert bob[0]["image"].shape == (168, 224, 3) and bob[6]["image"].shape == (168, 224, 3)
    with Image.open(tmp_path / "roxford5k" / "jpg" / f"{qimlist[0]}.jpg") as im:
        full = im.convert("RGB")
    expected = full.copy()
    expected.thumbnail((224, 224), Image.Resampling.LANCZOS)
    np.testing.assert_array_equal(bob[6]["image"], np.asarray(expected))
    # Official: queries cropped to bbx with PIL's rounding (2.4 -> 2, 3.5 -> 4, 20.6 -> 21, 25.5 -> 26),
    # database images untouched.
    official = get_source("revisited:roxford5k", "official", data_dir=tmp_path)
    np.testing.assert_array_equal(official[6]["image"], np.asarray(full)[4:26, 2:21])
    assert official[0]["image"].shape == (300, 400, 3)
    desc = official.describe()
    assert desc["queries"] == {"crop_to_bbx": True, "thumbnail": None} and desc["split"] == "official"
    assert desc["name"] == "revisited:roxford5k" and len(desc["origin"]["gnd_sha256"]) == 64
    assert bob.describe()["queries"] == {"crop_to_bbx": False, "thumbnail": 224}
    # data_dir may be revisitop's data root or the dataset folder itself.
    assert len(RevisitedSource(tmp_path / "roxford5k", "roxford5k")) == 8


def test_revisited_source_errors_name_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"gnd_rparis6k\.pkl.*cmp\.felk\.cvut\.cz/revisitop"):
        get_source("revisited:rparis6k", "bob", data_dir=tmp_path)
    with pytest.raises(ValueError, match="needs data_dir"):
        get_source("revisited:roxford5k", "bob")
    with pytest.raises(ValueError, match="unknown revisited dataset"):
        RevisitedSource(tmp_path, "oxford105k")
    _make_revisited(tmp_path)
    with pytest.raises(ValueError, match=r"splits \('bob', 'official'\)"):
        get_source("revisited:roxford5k", "test", data_dir=tmp_path)
    (tmp_path / "roxford5k" / "jpg" / "all_souls_000003.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="1 of the 8 images.*all_souls_000003"):
        get_source("revisited:roxford5k", "bob", data_dir=tmp_path)


def test_revisited_pickle_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    folder = tmp_path / "roxford5k"
    (folder / "jpg").mkdir(parents=True)
    with open(folder / "gnd_roxford5k.pkl", "wb") as f:
        pickle.dump({"imlist": [], "qimlist": [], "gnd": [Evil()]}, f)
    with pytest.raises(ValueError, match="not a readable revisitop ground-truth pickle"):
        RevisitedSource(tmp_path, "roxford5k")
    assert not marker.exists()
    with open(folder / "gnd_roxford5k.pkl", "wb") as f:
        pickle.dump({"imlist": ["a"], "qimlist": ["q"], "gnd": [{"easy": [3], "hard": [], "junk": []}]}, f)
    with pytest.raises(ValueError, match=r"outside \[0, 1\)"):
        RevisitedSource(tmp_path, "roxford5k")


def test_revisited_task_on_features(tmp_path):
    _make_revisited(tmp_path)
    source = get_source("revisited:roxford5k", "bob", data_dir=tmp_path)
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((len(source), 8)).astype(np.float32)
    cfg = {"protocol": "revisited", "ks": (1, 5, 10), "descriptor": "bob", "query_fraction": 0.2,
           "max_per_class": 0}
    task = TASKS["retrieval"]
    assert not task.train_needed(cfg) and task.primary_for(cfg) == "mAP_medium"
    metrics, per_query = task.run(None, Features(feats, source.labels(), "k"), num_classes=2, cfg=cfg,
                                  mesh=None, workdir="", progress=False, sources=DataSplits(None, source))
    expected, _ = R.revisited_retrieval(feats[6:], feats[:6], source.gnd)
    assert {k: v for k, v in metrics.items() if not k.startswith("num_")} == expected
    assert (metrics["num_database"], metrics["num_queries"]) == (6, 2)
    assert np.nanmean(per_query) == pytest.approx(metrics["mAP_medium"])
    with pytest.raises(ValueError, match="whole revisited source"):
        task.run(None, Features(feats[:4], source.labels()[:4], "k"), num_classes=2, cfg=cfg, mesh=None,
                 workdir="", progress=False, sources=DataSplits(None, Subset(source, np.arange(4))))
    shuffled = Features(feats, source.labels()[::-1].copy(), "k")
    with pytest.raises(ValueError, match="database-then-queries order"):
        task.run(None, shuffled, num_classes=2, cfg=cfg, mesh=None, workdir="", progress=False,
                 sources=DataSplits(None, source))


# ----------------------------------------------------------------------------------------------------------
# Descriptor per backbone family
# ----------------------------------------------------------------------------------------------------------

_TINY_VIT = dict(depth=2, embed_dim=64, num_heads=4, img_size=32, num_classes=0)


@pytest.mark.parametrize(
    "name,kwargs,expected",
    [
        ("vit_base_patch16_224.mae", {}, "pooled"),  # class-token pooling: pooled is the normed class token
        ("vit_small_patch16_224.mocov3", {}, "pooled"),
        ("vit_base_patch16_clip_224.laion2b", {}, "pooled"),
        ("vit_base_patch16_224.mae", dict(global_pool="avg", fc_norm=False), "cls_token"),
        ("vit_base_patch16_224.augreg_in1k", dict(global_pool="avg", fc_norm=False), "pooled"),
        ("vit_small_patch16_224.dino", {}, "pooled"),
    ],
)
def test_bob_descriptor_for_vits(name, kwargs, expected):
    model = backbones.create(name, **{**_TINY_VIT, **kwargs})
    assert R.bob_descriptor(model) == expected
    assert TASKS["retrieval"].output_for(model, {"descriptor": "pooled"}) == "pooled"
    assert TASKS["retrieval"].output_for(model, {"descriptor": "bob"}) == expected
    with pytest.raises(ValueError, match="descriptor='mean'"):
        TASKS["retrieval"].output_for(model, {"descriptor": "mean"})


def test_bob_descriptor_by_name_for_other_families():
    def named(name):  # a stand-in model: the rule reads only the name for these families
        return SimpleNamespace(name=name)

    # CLIP ResNets: the projected CLIP embedding; MiDaS: the 1000-way ImageNet head's logits (bob-spec 5.1).
    assert R.bob_descriptor(named("resnet50_clip.openai")) == "logits"
    assert R.bob_descriptor(named("resnet50x64_clip.openai")) == "logits"
    assert R.bob_descriptor(named("swinv2_base_window12to24_192to384.midas_v31")) == "logits"
    for name in ("resnet50.a1_in1k", "resnet50.vicreg", "convnext_base.fb_in22k_ft_in1k",
                 "swinv2_tiny_window8_256.ms_in1k", "user_model.custom"):
        assert R.bob_descriptor(named(name)) == "pooled"


def test_class_token_descriptor_is_the_normed_class_token():
    x = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)
    token = backbones.create("vit_base_patch16_224.mae", seed=1, **_TINY_VIT)
    avg = backbones.create("vit_base_patch16_224.mae", seed=1, global_pool="avg", fc_norm=False, **_TINY_VIT)
    # Same seed and the same parameter tree: the class token of the avg-pooled model is the token model's
    # pooled output, and differs from the avg model's own pooled output.
    cls_avg, pooled_token = np.asarray(class_token(avg, x)), np.asarray(token(x)["pooled"])
    np.testing.assert_allclose(cls_avg, pooled_token, atol=1e-6)
    np.testing.assert_allclose(np.asarray(class_token(token, x)), pooled_token, atol=1e-6)
    assert np.abs(cls_avg - np.asarray(avg(x)["pooled"])).max() > 1e-2
    fc_norm = backbones.create("vit_base_patch16_224.mae", global_pool="avg", **_TINY_VIT)
    with pytest.raises(ValueError, match="fc_norm"):
        class_token(fc_norm, x)
    with pytest.raises(ValueError, match="class token"):
        class_token(SimpleNamespace(name="resnet50.a1_in1k", cfg=None), x)


@pytest.mark.reference
def test_class_token_descriptor_matches_timm_forward_features(reference):
    torch, timm = reference
    from bob_jax.testing.reference import redraw_parameters, state_dict_numpy

    kw = {**_TINY_VIT, "global_pool": "avg", "fc_norm": False}
    ref = redraw_parameters(timm.create_model("vit_base_patch16_224", pretrained=False, **kw).eval(), 0)
    model = backbones.from_timm_state_dict("vit_base_patch16_224", state_dict_numpy(ref), **kw)
    x = np.random.default_rng(1).standard_normal((2, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        expected = ref.forward_features(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))[:, 0].numpy()
    assert expected.std() > 0.1
    np.testing.assert_allclose(np.asarray(class_token(model, x)), expected, atol=1e-4)


def test_image_folder_names_are_relative_paths(tmp_path):
    _make_tree(tmp_path, {"b": 2, "a": 1})
    source = ImageFolder(tmp_path, "all")
    assert source.names() == ("a/a_3.jpg", "b/b_10.jpg", "b/b_3.jpg")
