"""download_timm_weights: repo/file naming, the pytorch_model.bin fallback, offline and connection errors.

No network here: `huggingface_hub.hf_hub_download` is replaced by fakes, except in the cache tests, which run
the real function in offline mode against a cache laid out on disk.
"""

from __future__ import annotations

import importlib
import importlib.util
import pathlib
from typing import ClassVar

import huggingface_hub
import pytest
from huggingface_hub import constants
from huggingface_hub import errors as hf_errors

import bob_jax.io as bio


class _FakeHub:
    """Records calls; `outcomes[filename]` is a path to return or an exception to raise."""

    def __init__(self, outcomes: dict):
        self.outcomes = outcomes
        self.calls: list[tuple[str, str, dict]] = []

    def __call__(self, repo_id, filename, **kwargs):
        self.calls.append((repo_id, filename, kwargs))
        outcome = self.outcomes[filename]
        if isinstance(outcome, BaseException):
            raise outcome
        return str(outcome)


def _install(monkeypatch, outcomes) -> _FakeHub:
    fake = _FakeHub(outcomes)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake)
    return fake


class _Response:
    """Just enough of an HTTP response for huggingface_hub's error constructors."""

    headers: ClassVar[dict] = {}
    request = None
    status_code = 404


def _remote_missing(filename: str) -> hf_errors.EntryNotFoundError:
    return hf_errors.RemoteEntryNotFoundError(f"{filename} not found in repo", response=_Response())


def test_safetensors_first(monkeypatch, tmp_path):
    fake = _install(monkeypatch, {"model.safetensors": tmp_path / "model.safetensors"})
    path = bio.download_timm_weights("resnet50.a1_in1k", cache_dir=tmp_path, revision="abc")
    assert path == tmp_path / "model.safetensors" and isinstance(path, pathlib.Path)
    assert [(r, f) for r, f, _ in fake.calls] == [("timm/resnet50.a1_in1k", "model.safetensors")]
    assert fake.calls[0][2]["cache_dir"] == tmp_path and fake.calls[0][2]["revision"] == "abc"


def test_falls_back_to_pytorch_model_bin(monkeypatch, tmp_path):
    fake = _install(
        monkeypatch,
        {
            "model.safetensors": _remote_missing("model.safetensors"),
            "pytorch_model.bin": tmp_path / "pytorch_model.bin",
        },
    )
    assert bio.download_timm_weights("vit_small_patch16_224.dino") == tmp_path / "pytorch_model.bin"
    assert [f for _, f, _ in fake.calls] == ["model.safetensors", "pytorch_model.bin"]
    assert fake.calls[1][2]["local_files_only"] is False  # the hub answered, so the fallback may download


def test_offline_and_not_cached(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fake = _install(
        monkeypatch,
        {
            f: hf_errors.LocalEntryNotFoundError("not cached")
            for f in ("model.safetensors", "pytorch_model.bin")
        },
    )
    with pytest.raises(bio.WeightsUnavailableError) as err:
        bio.download_timm_weights("convnext_tiny.fb_in1k")
    msg = str(err.value)
    assert "timm/convnext_tiny.fb_in1k" in msg and "model.safetensors" in msg and "pytorch_model.bin" in msg
    assert "HF_HUB_OFFLINE" in msg and "weights=/path/to/" in msg and "HF_HOME" in msg
    assert isinstance(err.value, FileNotFoundError)
    assert fake.calls[1][2]["local_files_only"] is True  # no second round of connection retries


@pytest.mark.parametrize("error", [ConnectionError("Name or service not known"), TimeoutError("timed out")])
def test_connection_errors(monkeypatch, error):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    _install(
        monkeypatch, {"model.safetensors": error, "pytorch_model.bin": hf_errors.LocalEntryNotFoundError("x")}
    )
    with pytest.raises(bio.WeightsUnavailableError, match=f"timm/resnet18.a1_in1k.*{type(error).__name__}"):
        bio.download_timm_weights("resnet18.a1_in1k")


def test_httpx_transport_errors_count_as_offline_and_others_propagate(monkeypatch):
    # The client huggingface_hub uses: httpx2 in hub 2.x, httpx before.
    httpx2 = importlib.import_module("httpx2" if importlib.util.find_spec("httpx2") else "httpx")

    _install(
        monkeypatch,
        {
            "model.safetensors": httpx2.ConnectError("dns"),
            "pytorch_model.bin": hf_errors.LocalEntryNotFoundError("x"),
        },
    )
    with pytest.raises(bio.WeightsUnavailableError, match="ConnectError: dns"):
        bio.download_timm_weights("resnet18.a1_in1k")
    _install(monkeypatch, {"model.safetensors": KeyError("a bug, not a network problem")})
    with pytest.raises(KeyError):
        bio.download_timm_weights("resnet18.a1_in1k")


def test_unknown_repo_and_untagged_name(monkeypatch):
    fake = _install(
        monkeypatch, {"model.safetensors": hf_errors.RepositoryNotFoundError("404", response=_Response())}
    )
    with pytest.raises(bio.WeightsUnavailableError, match="timm/resnet51.a1_in1k .* not available"):
        bio.download_timm_weights("resnet51.a1_in1k")
    assert len(fake.calls) == 1
    with pytest.raises(ValueError, match="arch.tag"):
        bio.download_timm_weights("resnet50")


def _populate_cache(cache: pathlib.Path, repo: str, filename: str, content: bytes) -> pathlib.Path:
    """The hub cache layout: models--org--name/{refs/main, snapshots/<commit>/<file>}."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / filename).write_bytes(content)
    return snapshot / filename


def test_real_hub_offline_reads_a_prepopulated_cache(monkeypatch, tmp_path):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    cached = _populate_cache(tmp_path, "timm/resnet18.a1_in1k", "pytorch_model.bin", b"weights")
    assert bio.download_timm_weights("resnet18.a1_in1k", cache_dir=tmp_path) == cached

    with pytest.raises(bio.WeightsUnavailableError, match="timm/resnet18.tv_in1k.*not in the local cache"):
        bio.download_timm_weights("resnet18.tv_in1k", cache_dir=tmp_path)
