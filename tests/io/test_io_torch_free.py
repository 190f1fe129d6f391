"""bob_jax.io on files built without torch: both torch.save layouts, safetensors (bf16), npz, plain pickles,
key selection, and the error messages for empty, truncated, unrelated and missing files."""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import pickle
import struct
import subprocess
import sys
import zipfile

import ml_dtypes
import numpy as np
import pytest

import bob_jax.io as bio

BF16 = np.dtype(ml_dtypes.bfloat16)


def _sample(ckpt, fmt: str, path, *, prefix: str = "archive"):
    """A wrapped checkpoint with views, offsets, a shared storage and six dtypes; returns expected arrays."""
    legacy = fmt == "legacy"
    f32 = np.arange(12, dtype=np.float32) * 1.5 - 3
    bf16 = np.array([1.5, -2.0, 3.25, 0.1], dtype=BF16)
    i64 = np.array([0, -1, 2**40], dtype=np.int64)
    flags = np.array([True, False, True])
    f16 = np.array([[0.5, -1.0], [65504.0, 1e-3]], dtype=np.float16)
    f8 = np.array([0.5, -2.0, 448.0], dtype=ml_dtypes.float8_e4m3fn)
    raw = {"0": (f32, 4), "1": (bf16, 2), "2": (i64, 8), "3": (flags, 1), "4": (f16, 2), "5": (f8, 1)}
    classes = {
        "0": "FloatStorage",
        "1": "BFloat16Storage",
        "2": "LongStorage",
        "3": "BoolStorage",
        "4": "HalfStorage",
    }

    def sid(key):
        if key == "5":
            return ckpt.storage(key, "UntypedStorage", 3, legacy=legacy, module="torch.storage")
        return ckpt.storage(key, classes[key], raw[key][0].size, legacy=legacy)

    t = ckpt.tensor
    model = ckpt.OD(
        {
            "w": t(sid("0"), 0, (3, 4), (4, 1)),
            "wt": t(sid("0"), 0, (4, 3), (1, 4)),  # transposed view of the same storage
            "tail": t(sid("0"), 5, (3,), (2,)),  # storage offset + step
            "bf": t(sid("1"), 0, (2, 2), (2, 1)),
            "idx": t(sid("2"), 0, (3,), (1,)),
            "mask": t(sid("3"), 0, (3,), (1,)),
            "half": t(sid("4"), 0, (2, 2), (1, 2)),  # column-major view
            "f8": t(sid("5"), 0, (3,), (1,), dtype="float8_e4m3fn"),
            "empty": t(sid("0"), 12, (0, 4), (4, 1)),
        }
    )
    tree = {
        "model": model,
        "epoch": 7,
        "args": argparse.Namespace(lr=0.1, arch="vit_small"),
        "best": np.float64(0.5),
        "nested": {"ema": {"w": t(sid("0"), 4, (4,), (1,))}},
    }
    if legacy:
        ckpt.write_legacy(path, tree, {k: (a.tobytes(), n) for k, (a, n) in raw.items()})
    else:
        ckpt.write_zip(path, tree, {k: a.tobytes() for k, (a, _) in raw.items()}, prefix=prefix)
    w = f32.reshape(3, 4)
    return {
        "w": w,
        "wt": w.T,
        "tail": f32[5:11:2],
        "bf": bf16.reshape(2, 2),
        "idx": i64,
        "mask": flags,
        "half": f16.reshape(-1).reshape(2, 2, order="F"),
        "f8": f8,
        "empty": np.zeros((0, 4), np.float32),
        "ema": f32[4:8],
    }


def _bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == np.ascontiguousarray(b).tobytes()


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_torch_layouts_rebuild_tensors_and_plain_data(ckpt, tmp_path, fmt):
    path = tmp_path / "ckpt.pth.tar"
    expected = _sample(ckpt, fmt, path)
    tree = bio.load_checkpoint_tree(path)

    assert list(tree) == ["model", "epoch", "args", "best", "nested"]
    assert isinstance(tree["model"], collections.OrderedDict)
    assert list(tree["model"]) == ["w", "wt", "tail", "bf", "idx", "mask", "half", "f8", "empty"]
    for name, array in tree["model"].items():
        assert _bits_equal(array, expected[name]), name
        assert array.flags.c_contiguous and array.flags.writeable
    assert _bits_equal(tree["nested"]["ema"]["w"], expected["ema"])
    assert tree["epoch"] == 7
    assert isinstance(tree["args"], bio.CheckpointNamespace) and vars(tree["args"]) == {
        "lr": 0.1,
        "arch": "vit_small",
    }
    assert type(tree["best"]) is np.float64 and tree["best"] == 0.5
    # Views of one storage are copies, not aliases.
    tree["model"]["w"][0, 0] = 99
    assert tree["model"]["wt"][0, 0] == expected["wt"][0, 0]


def test_zip_folder_name_is_arbitrary_and_npz_ext_is_ignored(ckpt, tmp_path):
    path = tmp_path / "weights.npz"  # the extension lies: content decides
    expected = _sample(ckpt, "zip", path, prefix="resnet50_a1-0014-abcdef")
    sd = bio.load_state_dict(path, key="model")
    assert _bits_equal(sd["wt"], expected["wt"])


def test_big_endian_zip(ckpt, tmp_path):
    f32 = np.array([1.0, -2.5, 3.0e8], dtype=np.float32)
    bf16 = np.array([1.5, -2.0], dtype=BF16)
    c64 = np.array([1 + 2j, -3.5 - 0.25j], dtype=np.complex64)
    tree = {
        "a": ckpt.tensor(ckpt.storage("0", "FloatStorage", 3), 0, (3,), (1,)),
        "b": ckpt.tensor(ckpt.storage("1", "BFloat16Storage", 2), 0, (2,), (1,)),
        "c": ckpt.tensor(ckpt.storage("2", "ComplexFloatStorage", 2), 0, (2,), (1,)),
    }
    storages = {
        "0": f32.astype(">f4").tobytes(),
        "1": bf16.view(np.uint16).astype(">u2").tobytes(),
        "2": c64.astype(">c8").tobytes(),
    }
    ckpt.write_zip(tmp_path / "be.pt", tree, storages, byteorder="big")
    sd = bio.load_state_dict(tmp_path / "be.pt")
    assert _bits_equal(sd["a"], f32) and _bits_equal(sd["b"], bf16) and _bits_equal(sd["c"], c64)


def test_tensor_metadata_conj_and_neg(ckpt, tmp_path):
    c64 = np.array([1 + 2j, 3 - 1j], dtype=np.complex64)
    hooks = ckpt.R(ckpt.G("collections", "OrderedDict"))
    rebuild = ckpt.G("torch._utils", "_rebuild_tensor_v2")
    tree = {
        "conj": ckpt.R(
            rebuild, ckpt.storage("0", "ComplexFloatStorage", 2), 0, (2,), (1,), False, hooks, {"conj": True}
        ),
        "neg": ckpt.R(
            rebuild, ckpt.storage("0", "ComplexFloatStorage", 2), 0, (2,), (1,), False, hooks, {"neg": True}
        ),
    }
    ckpt.write_zip(tmp_path / "m.pt", tree, {"0": c64.tobytes()})
    sd = bio.load_state_dict(tmp_path / "m.pt")
    np.testing.assert_array_equal(sd["conj"], np.conj(c64))
    np.testing.assert_array_equal(sd["neg"], -c64)


def test_torch_globals_parameter_size_device_dtype(ckpt, tmp_path):
    data = np.array([1.0, 2.0], dtype=np.float32)
    pid = ckpt.storage("0", "FloatStorage", 2)
    param = ckpt.R(
        ckpt.G("torch._utils", "_rebuild_parameter"),
        ckpt.tensor(pid, 0, (2,), (1,)),
        True,
        ckpt.R(ckpt.G("collections", "OrderedDict")),
    )
    with_attrs = ckpt.R(
        ckpt.G("torch._tensor", "_rebuild_from_type_v2"),
        ckpt.G("torch._utils", "_rebuild_tensor_v2"),
        ckpt.G("torch", "Tensor"),
        (pid, 0, (2,), (1,), False, ckpt.R(ckpt.G("collections", "OrderedDict"))),
        {"note": "x"},
    )
    tree = {
        "p": param,
        "t": with_attrs,
        "size": ckpt.R(ckpt.G("torch", "Size"), (2, 3)),
        "dev": ckpt.R(ckpt.G("torch", "device"), "cuda", 1),
        "dtype": ckpt.G("torch", "bfloat16"),
        "storage": pid,
        "gpu": ckpt.tensor(ckpt.storage("0", "FloatStorage", 2, module="torch.cuda"), 1, (1,), (1,)),
    }
    ckpt.write_zip(tmp_path / "g.pt", tree, {"0": data.tobytes()})
    tree = bio.load_checkpoint_tree(tmp_path / "g.pt")
    assert (
        _bits_equal(tree["p"], data) and _bits_equal(tree["t"], data) and _bits_equal(tree["storage"], data)
    )
    assert _bits_equal(tree["gpu"], data[1:])
    assert tree["size"] == (2, 3) and tree["dev"] == "cuda:1" and tree["dtype"] == "torch.bfloat16"


def test_legacy_storage_views(ckpt, tmp_path):
    # torch < 1.0 pickled views of storages: (view_key, offset, size) in elements of the root storage.
    data = np.arange(10, dtype=np.int32)
    view = ckpt.PID("storage", ckpt.G("torch", "IntStorage"), "0", "cpu", 10, ("v1", 4, 3))
    tree = {"v": ckpt.tensor(view, 1, (2,), (1,))}
    ckpt.write_legacy(tmp_path / "old.pth", tree, {"0": (data.tobytes(), 4)})
    assert _bits_equal(bio.load_state_dict(tmp_path / "old.pth")["v"], data[5:7])


# ---------------------------------------------------------------------------------------------------------
# key selection


def test_key_selection_and_wrapper_error(ckpt, tmp_path):
    path = tmp_path / "moco.pth.tar"
    data = np.arange(4, dtype=np.float32)
    pid = ckpt.storage("0", "FloatStorage", 4)
    state = ckpt.OD(
        {
            "module.base_encoder.conv1.weight": ckpt.tensor(pid, 0, (2,), (1,)),
            "module.base_encoder.fc.bias": ckpt.tensor(pid, 2, (2,), (1,)),
            "module.predictor.0.weight": ckpt.tensor(pid, 0, (4,), (1,)),
        }
    )
    ckpt.write_zip(
        path,
        {"epoch": 100, "arch": "resnet50", "state_dict": state, "optimizer": {"lr": 0.1}},
        {"0": data.tobytes()},
    )

    with pytest.raises(bio.CheckpointError) as err:
        bio.load_state_dict(path)
    msg = str(err.value)
    assert str(path) in msg and "'epoch' (int)" in msg and "'state_dict'" in msg and "key='state_dict'" in msg

    full = bio.load_state_dict(path, key="state_dict")
    assert list(full) == [
        "module.base_encoder.conv1.weight",
        "module.base_encoder.fc.bias",
        "module.predictor.0.weight",
    ]
    enc = bio.load_state_dict(path, key="state_dict.module.base_encoder")
    assert list(enc) == ["conv1.weight", "fc.bias"]
    assert _bits_equal(enc["fc.bias"], data[2:])
    # A full dotted tensor name is a key, not a prefix: it selects an array, which is not a dict.
    with pytest.raises(bio.CheckpointError, match="not a name -> tensor dict"):
        bio.load_state_dict(path, key="state_dict.module.base_encoder.fc.bias")
    with pytest.raises(
        bio.CheckpointError, match="'teacher' is neither a key nor a name prefix.*'state_dict'"
    ):
        bio.load_state_dict(path, key="teacher")
    with pytest.raises(bio.CheckpointError, match="not tensors: 'lr' \\(float\\)"):
        bio.load_state_dict(path, key="optimizer")


def test_nested_tensor_dicts_are_flattened(ckpt, tmp_path):
    pid = ckpt.storage("0", "FloatStorage", 2)
    tree = {"encoder": {"w": ckpt.tensor(pid, 0, (2,), (1,)), "b": ckpt.tensor(pid, 1, (1,), (1,))}}
    ckpt.write_zip(tmp_path / "n.pt", tree, {"0": np.ones(2, np.float32).tobytes()})
    assert sorted(bio.load_state_dict(tmp_path / "n.pt")) == ["encoder.b", "encoder.w"]


# ---------------------------------------------------------------------------------------------------------
# safetensors, npz, plain pickles


def test_safetensors_bf16_by_hand_matches_safetensors_flax(ckpt, tmp_path):
    rng = np.random.default_rng(0)
    bf = rng.normal(size=(3, 5)).astype(BF16)
    f32 = rng.normal(size=(4,)).astype(np.float32)
    i64 = np.array([[1, -2], [3, 2**50]], dtype=np.int64)
    path = tmp_path / "model.safetensors"
    ckpt.write_safetensors(
        path, {"a.bf": ("BF16", bf), "b.f32": ("F32", f32), "c.i64": ("I64", i64)}, metadata={"format": "pt"}
    )
    sd = bio.load_state_dict(path)
    assert list(sd) == ["a.bf", "b.f32", "c.i64"]
    assert _bits_equal(sd["a.bf"], bf) and _bits_equal(sd["b.f32"], f32) and _bits_equal(sd["c.i64"], i64)
    assert sd["a.bf"].dtype == BF16

    from safetensors import safe_open

    with safe_open(path, framework="flax") as f:
        ref = np.asarray(f.get_tensor("a.bf"))
    assert _bits_equal(sd["a.bf"], ref)


def test_safetensors_written_by_the_package(tmp_path):
    from safetensors.numpy import save_file

    tensors = {
        "x": np.arange(6, dtype=np.float16).reshape(2, 3),
        "y": np.array([True, False]),
        "z": np.zeros((0, 3), np.float32),
    }
    path = tmp_path / "weights.pth"  # wrong extension on purpose
    save_file(tensors, str(path))
    sd = bio.load_state_dict(path)
    assert set(sd) == set(tensors)
    for k, v in tensors.items():
        assert _bits_equal(sd[k], v), k


def test_npz_and_plain_pickle(tmp_path):
    arrays = {"conv.weight": np.ones((2, 3), np.float32), "fc.bias": np.arange(3, dtype=np.int64)}
    np.savez(tmp_path / "w.npz", **arrays)
    sd = bio.load_state_dict(tmp_path / "w.npz")
    assert set(sd) == set(arrays) and all(_bits_equal(sd[k], v) for k, v in arrays.items())

    # detectron2-style .pkl: a plain pickle of numpy arrays, Fortran order and big-endian included.
    obj = {
        "model": {"a": np.asfortranarray(np.arange(6.0).reshape(2, 3)), "b": np.arange(3, dtype=">i4")},
        "__author__": "d2",
        "matching_heuristics": True,
    }
    for protocol in (2, 4, 5):
        (tmp_path / "d2.pkl").write_bytes(pickle.dumps(obj, protocol=protocol))
        sd = bio.load_state_dict(tmp_path / "d2.pkl", key="model")
        np.testing.assert_array_equal(sd["a"], obj["model"]["a"])
        np.testing.assert_array_equal(sd["b"], obj["model"]["b"])
        assert sd["b"].dtype == np.dtype("int32")


def test_sha256_file(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"bob" * 1000)
    assert bio.sha256_file(path) == hashlib.sha256(b"bob" * 1000).hexdigest()
    assert bio.sha256_file(path, chunk_size=7) == hashlib.sha256(b"bob" * 1000).hexdigest()


# ---------------------------------------------------------------------------------------------------------
# errors


def test_missing_empty_directory_and_unrelated_files(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth: no such checkpoint file"):
        bio.load_state_dict(missing)
    with pytest.raises(bio.CheckpointError):
        bio.sha256_file(missing)

    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(bio.CheckpointError, match=r"empty.pth: empty file \(0 bytes\)"):
        bio.load_state_dict(empty)

    with pytest.raises(bio.CheckpointError, match="is a directory"):
        bio.load_state_dict(tmp_path)

    png = tmp_path / "cat.pth"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 100)
    with pytest.raises(bio.CheckpointError) as err:
        bio.load_state_dict(png)
    assert str(png) in str(
        err.value
    ) and "not a PyTorch/safetensors checkpoint: starts with b'\\x89PNG" in str(err.value)

    text = tmp_path / "notes.bin"
    text.write_text("these are not weights\n")
    with pytest.raises(
        bio.CheckpointError, match="notes.bin: not a PyTorch/safetensors checkpoint: starts with b'these a"
    ):
        bio.load_state_dict(text)

    other_zip = tmp_path / "other.pt"
    with zipfile.ZipFile(other_zip, "w") as zf:
        zf.writestr("readme.txt", "hi")
    with pytest.raises(bio.CheckpointError, match=r"other.pt: a zip archive but neither .*readme.txt"):
        bio.load_state_dict(other_zip)


def test_truncated_zip(ckpt, tmp_path):
    path = tmp_path / "full.pth"
    _sample(ckpt, "zip", path)
    blob = path.read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(bio.CheckpointError, match=r"cut.pth: truncated or damaged zip archive"):
        bio.load_checkpoint_tree(cut)

    # Storage entry shorter than the pickle declares.
    short = tmp_path / "short.pth"
    pid = ckpt.storage("3", "FloatStorage", 1024)
    ckpt.write_zip(short, {"w": ckpt.tensor(pid, 0, (1024,), (1,))}, {"3": b"\x00" * 1000})
    with pytest.raises(
        bio.CheckpointError, match=r"short.pth: truncated: storage 3 declares 4096 bytes, 1000 remain"
    ):
        bio.load_state_dict(short)

    gone = tmp_path / "gone.pth"
    ckpt.write_zip(gone, {"w": ckpt.tensor(pid, 0, (1024,), (1,))}, {})
    with pytest.raises(bio.CheckpointError, match=r"gone.pth: storage '3' is missing from the archive"):
        bio.load_state_dict(gone)


def test_truncated_legacy(ckpt, tmp_path):
    pid = ckpt.storage("3", "FloatStorage", 1024, legacy=True)
    tree = {"w": ckpt.tensor(pid, 0, (1024,), (1,))}
    blob = ckpt.legacy_bytes(tree, {"3": (np.zeros(1024, np.float32).tobytes(), 4)})
    path = tmp_path / "legacy.pth"

    path.write_bytes(blob[:-3096])  # inside the storage bytes
    with pytest.raises(
        bio.CheckpointError, match=r"legacy.pth: truncated: storage 3 declares 4096 bytes, 1000 remain"
    ):
        bio.load_state_dict(path)

    path.write_bytes(blob[: -4096 - 4])  # inside the element-count header
    with pytest.raises(
        bio.CheckpointError, match=r"truncated: storage 3 size header needs 8 bytes, 4 remain"
    ):
        bio.load_state_dict(path)

    header = len(pickle.dumps(ckpt.LEGACY_MAGIC, protocol=2)) + len(pickle.dumps(1001, protocol=2))
    path.write_bytes(blob[: header + 30])  # inside the sys_info pickle
    with pytest.raises(
        bio.CheckpointError, match=r"legacy.pth: truncated: the sys_info record .* ends early"
    ):
        bio.load_state_dict(path)

    main_start = blob.index(b"\x80\x02}(")  # the emitter writes the main dict as EMPTY_DICT MARK
    path.write_bytes(blob[: main_start + 40])
    with pytest.raises(bio.CheckpointError, match=r"legacy.pth: truncated: the main pickle .* ends early"):
        bio.load_state_dict(path)


def test_truncated_and_corrupt_safetensors(ckpt, tmp_path):
    path = tmp_path / "m.safetensors"
    ckpt.write_safetensors(path, {"a": ("F32", np.ones(100, np.float32))})
    blob = path.read_bytes()
    path.write_bytes(blob[:-100])
    with pytest.raises(
        bio.CheckpointError,
        match=r"m.safetensors: truncated: tensor 'a' declares data bytes \[0, 400\), 300 remain",
    ):
        bio.load_state_dict(path)
    path.write_bytes(blob[:20])
    with pytest.raises(
        bio.CheckpointError, match=r"m.safetensors: truncated: the safetensors header declares"
    ):
        bio.load_state_dict(path)
    header = json.dumps({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\x00" * 8)
    with pytest.raises(bio.CheckpointError, match=r"shape \(3,\) of F32 needs 12 bytes"):
        bio.load_state_dict(path)


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_out_of_bounds_views_are_rejected(ckpt, tmp_path, fmt):
    # A hostile size/stride must not read outside the storage (as_strided would happily do so).
    legacy = fmt == "legacy"
    pid = ckpt.storage("0", "FloatStorage", 4, legacy=legacy)
    tree = {"w": ckpt.tensor(pid, 1, (2, 2), (3, 1))}
    path = tmp_path / "oob.pt"
    data = np.zeros(4, np.float32).tobytes()
    if legacy:
        ckpt.write_legacy(path, tree, {"0": (data, 4)})
    else:
        ckpt.write_zip(path, tree, {"0": data})
    with pytest.raises(
        bio.CheckpointError, match=r"oob.pt: tensor 'w' .* reads element 5 of storage '0', which holds 4"
    ):
        bio.load_state_dict(path)


def test_inconsistent_legacy_storage_count(ckpt, tmp_path):
    pid = ckpt.storage("0", "FloatStorage", 4, legacy=True)
    path = tmp_path / "bad.pth"
    ckpt.write_legacy(
        path, {"w": ckpt.tensor(pid, 0, (4,), (1,))}, {"0": (np.zeros(3, np.float32).tobytes(), 4)}
    )
    with pytest.raises(bio.CheckpointError, match="storage 0 holds 3 elements, the pickle declares 4"):
        bio.load_state_dict(path)


def test_hostile_structures_give_checkpoint_errors(ckpt, tmp_path):
    pid = ckpt.storage("0", "FloatStorage", 4)
    path = tmp_path / "x.pt"
    data = {"0": np.zeros(4, np.float32).tobytes()}
    # An expanded (zero-stride) tensor of 2**40 elements over 16 bytes must not be materialised.
    ckpt.write_zip(path, {"w": ckpt.tensor(pid, 0, (2**20, 2**20), (0, 0))}, data)
    with pytest.raises(bio.CheckpointError, match="would expand a 16-byte storage"):
        bio.load_state_dict(path)
    # A tensor as a dict key becomes an (unhashable) array.
    ckpt.write_zip(path, {"w": {ckpt.tensor(pid, 0, (4,), (1,)): 1}}, data)
    with pytest.raises(bio.CheckpointError, match="cannot rebuild the checkpoint's structure"):
        bio.load_checkpoint_tree(path)


def test_imports_and_reads_without_torch_grain_or_tfds(ckpt, tmp_path):
    # A fresh interpreter where importing torch/grain/tfds/huggingface_hub fails: bob_jax.io must not need them.
    path = tmp_path / "w.pth"
    _sample(ckpt, "legacy", path)
    code = (
        "import sys\n"
        "for m in ('torch', 'grain', 'tensorflow_datasets', 'huggingface_hub', 'timm', 'jax'):\n"
        "    sys.modules[m] = None\n"
        "import bob_jax.io as bio\n"
        f"sd = bio.load_state_dict({str(path)!r}, key='model')\n"
        "assert sd['bf'].dtype.name == 'bfloat16', sd['bf'].dtype\n"
        "print(len(sd))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "9"
