"""Release-file downloads (file:// URLs stand in for the network): cache, SHA-256, offline errors."""

import hashlib

import pytest

from bob_jax.io.errors import CheckpointError, WeightsUnavailableError
from bob_jax.io.release import download_release_file


@pytest.fixture
def release(tmp_path, monkeypatch):
    monkeypatch.setenv("BOB_JAX_WEIGHTS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("BOB_JAX_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    src = tmp_path / "remote" / "w.pth"
    src.parent.mkdir()
    src.write_bytes(b"weights" * 100)
    return src, hashlib.sha256(src.read_bytes()).hexdigest()


def test_download_caches_and_verifies(release, tmp_path):
    src, sha = release
    path = download_release_file(src.as_uri(), "w.pth", sha256=sha)
    assert path.read_bytes() == src.read_bytes() and path.parent == tmp_path / "cache"
    src.unlink()  # the cached copy is used from now on
    assert download_release_file(src.as_uri(), "w.pth", sha256=sha) == path


def test_wrong_hash_is_refused_and_not_cached(release, tmp_path):
    src, _ = release
    with pytest.raises(CheckpointError, match="SHA-256"):
        download_release_file(src.as_uri(), "w.pth", sha256="0" * 64)
    assert not (tmp_path / "cache" / "w.pth").exists()
    assert not list((tmp_path / "cache").glob("*.part"))


def test_offline_or_unreachable_names_url_and_fix(release, monkeypatch, tmp_path):
    src, _ = release
    with pytest.raises(WeightsUnavailableError, match="could not download .*weights=/path/to/x.pth"):
        download_release_file((tmp_path / "missing.pth").as_uri(), "x.pth", what="resnet50.dino")
    monkeypatch.setenv("BOB_JAX_OFFLINE", "1")
    with pytest.raises(WeightsUnavailableError, match="downloads are off"):
        download_release_file(src.as_uri(), "w.pth")
