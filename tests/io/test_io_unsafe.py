"""The restricted unpickler refuses code-running pickles in every container layout, before anything runs."""

from __future__ import annotations

import os
import pickle
import sys

import numpy as np
import pytest

import bob_jax.io as bio


class _Pwn:
    """What a malicious checkpoint contains: unpickling it calls os.system."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _write(ckpt, layout: str, path, payload: bytes) -> None:
    """Put a pickle where each layout runs it first: a plain .pkl, zip data.pkl, the legacy main pickle,
    the legacy magic-number slot."""
    if layout == "plain":
        path.write_bytes(payload)
    elif layout == "zip":
        ckpt.write_zip(path, None, {}, pickled=payload)
    elif layout == "legacy":
        ckpt.write_legacy(path, None, {}, pickled=payload)
    elif layout == "legacy-magic":
        ckpt.write_legacy(path, {}, {}, magic=payload)
    else:
        raise AssertionError(layout)


LAYOUTS = ["plain", "zip", "legacy", "legacy-magic"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_reduce_to_os_system_is_refused_and_never_runs(ckpt, tmp_path, layout):
    sentinel = tmp_path / "pwned"
    weights = np.arange(3, dtype=np.float32)
    obj = {"state_dict": {"w": weights}, "hook": _Pwn(f"touch {sentinel}")}
    path = tmp_path / "evil.pth"
    _write(ckpt, layout, path, pickle.dumps(obj, protocol=2))
    # The payload really is live: the standard unpickler would run it.
    assert b"system" in path.read_bytes()

    for load in (bio.load_state_dict, bio.load_checkpoint_tree):
        with pytest.raises(bio.UnsafeCheckpointError) as err:
            load(path)
        msg = str(err.value)
        assert str(path) in msg
        assert f"{os.system.__module__}.system" in msg  # posix.system on Linux
        assert "converters/export_torch.py" in msg and "trusted environment" in msg
    assert not sentinel.exists()


@pytest.mark.parametrize(
    "module,name,args",
    [
        ("builtins", "eval", ("__import__('os').system('touch {s}')",)),
        ("builtins", "exec", ("open('{s}', 'w').close()",)),
        ("__builtin__", "eval", ("open('{s}', 'w')",)),
        ("builtins", "getattr", ("x", "upper")),
        ("builtins", "__import__", ("os",)),
        ("subprocess", "Popen", (["touch", "{s}"],)),
        ("posix", "system", ("touch {s}",)),
        ("os", "system", ("touch {s}",)),
        ("torch", "load", ("{s}",)),
        ("torch.nn.modules.conv", "Conv2d", (3, 3, 3)),
        ("numpy", "load", ("{s}",)),
        ("importlib", "import_module", ("os",)),
        ("pickle", "loads", (b"x",)),
    ],
)
@pytest.mark.parametrize("layout", ["zip", "legacy"])
def test_off_allowlist_globals_are_refused(ckpt, tmp_path, layout, module, name, args):
    sentinel = tmp_path / "pwned"
    args = tuple(a.format(s=sentinel) if isinstance(a, str) else a for a in args)
    args = tuple([x.format(s=sentinel) for x in a] if isinstance(a, list) else a for a in args)
    payload = ckpt.dumps({"w": ckpt.R(ckpt.G(module, name), *args)})
    path = tmp_path / "evil.pt"
    _write(ckpt, layout, path, payload)
    with pytest.raises(
        bio.UnsafeCheckpointError, match=f"asks for {module}.{name}, which is not on the allowlist"
    ):
        bio.load_checkpoint_tree(path)
    assert not sentinel.exists()


def test_find_class_never_imports(ckpt, tmp_path, monkeypatch):
    # A module whose import has a side effect: a refused global must not even import it.
    sentinel = tmp_path / "imported"
    (tmp_path / "bob_io_evil_module.py").write_text(f"open({str(sentinel)!r}, 'w').close()\ndef f(): pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = tmp_path / "evil.pt"
    ckpt.write_zip(path, None, {}, pickled=ckpt.dumps(ckpt.R(ckpt.G("bob_io_evil_module", "f"))))
    with pytest.raises(bio.UnsafeCheckpointError, match="bob_io_evil_module.f"):
        bio.load_state_dict(path)
    assert not sentinel.exists() and "bob_io_evil_module" not in sys.modules


def test_whole_model_pickles_are_refused(ckpt, tmp_path):
    # torch.save(model) pickles the module class; the restricted reader names it instead of importing it.
    path = tmp_path / "model.pt"
    obj = ckpt.R(
        ckpt.G("torch._utils", "_rebuild_parameter"),
        ckpt.R(ckpt.G("torchvision.models.resnet", "ResNet")),
        False,
        {},
    )
    ckpt.write_zip(path, None, {}, pickled=ckpt.dumps(obj))
    with pytest.raises(bio.UnsafeCheckpointError, match="torchvision.models.resnet.ResNet"):
        bio.load_checkpoint_tree(path)


def test_numpy_object_dtypes_and_other_abuse_are_rejected(ckpt, tmp_path):
    path = tmp_path / "x.pt"
    cases = {
        # numpy's own unpickling of object dtypes turns raw bytes into pointers.
        "object dtype": ckpt.R(
            ckpt.G("numpy.core.multiarray", "scalar"),
            ckpt.R(ckpt.G("numpy", "dtype"), "O8", False, True),
            b"\x00" * 8,
        ),
        "structured dtype state": ckpt.Build(
            ckpt.R(ckpt.G("numpy", "dtype"), "f4", False, True), (3, "<", None, ("a",), {"a": 1}, -1, -1, 0)
        ),
        "codec other than latin1": ckpt.R(ckpt.G("_codecs", "encode"), "x", "rot13"),
        "huge bytes": ckpt.R(ckpt.G("builtins", "bytes"), 10**12),
        "setting a marker's state": ckpt.Build(ckpt.G("torch", "FloatStorage"), {"dtype": "x"}),
        "tensor from a non-storage": ckpt.tensor("not a storage", 0, (1,), (1,)),
        "unsupported tensor kind": ckpt.R(ckpt.G("torch._utils", "_rebuild_qtensor"), 1),
    }
    for what, obj in cases.items():
        ckpt.write_zip(path, None, {}, pickled=ckpt.dumps({"x": obj}))
        with pytest.raises(bio.CheckpointError) as err:
            bio.load_checkpoint_tree(path)
        assert not isinstance(err.value, bio.UnsafeCheckpointError), what
        assert str(path) in str(err.value), what


def test_numpy_scalars_and_arrays_are_rebuilt_without_numpy_unpickling(ckpt, tmp_path):
    obj = {
        "s": np.float32(1.25),
        "i": np.int64(-3),
        "b": np.bool_(True),
        "a": np.arange(6, dtype=">f8").reshape(2, 3),
        "d": np.dtype("<i2"),
    }
    path = tmp_path / "np.pt"
    ckpt.write_zip(path, None, {}, pickled=pickle.dumps(obj, protocol=2))
    tree = bio.load_checkpoint_tree(path)
    assert type(tree["s"]) is np.float32 and tree["s"] == 1.25
    assert type(tree["i"]) is np.int64 and tree["i"] == -3
    assert type(tree["b"]) is np.bool_ and tree["b"]
    np.testing.assert_array_equal(tree["a"], obj["a"])
    assert tree["d"] == np.dtype("<i2")
