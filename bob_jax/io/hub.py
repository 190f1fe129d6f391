"""Fetch timm's pretrained weights from the Hugging Face hub (or its local cache), without timm or torch.

timm publishes every `arch.tag` as the hub repo `timm/<arch>.<tag>` with `model.safetensors` (older uploads:
`pytorch_model.bin` only). `huggingface_hub` is imported lazily so `bob_jax.io` imports without it.
"""

from __future__ import annotations

import os
import pathlib
import sys

from bob_jax.io.errors import WeightsUnavailableError

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _is_connection_error(error: BaseException) -> bool:
    """OSError subclasses (ConnectionError, timeouts, hub HTTP errors) or the TransportError of the httpx
    client huggingface_hub uses (`httpx`, renamed `httpx2` in hub 2.x; imported once it raised)."""
    if isinstance(error, OSError):
        return True
    for module in ("httpx", "httpx2"):
        transport = getattr(sys.modules.get(module), "TransportError", None)
        if isinstance(transport, type) and isinstance(error, transport):
            return True
    return False


def _unavailable(repo: str, tried: list[str], *, offline: bool) -> WeightsUnavailableError:
    why = "HF_HUB_OFFLINE is set" if offline else "the hub could not be reached or does not have them"
    return WeightsUnavailableError(
        f"weights for hub repo {repo} are not in the local cache and cannot be downloaded ({why}); tried: "
        f"{'; '.join(tried)}. Fix: on a connected machine run `hf download {repo} "
        f"{WEIGHT_FILES[0]}` (or download https://huggingface.co/{repo}/resolve/main/{WEIGHT_FILES[0]}) and "
        f"pass weights=/path/to/{WEIGHT_FILES[0]}, or point HF_HOME (or cache_dir=) at a pre-populated "
        f"Hugging Face cache"
    )


def download_timm_weights(
    name: str, *, cache_dir: str | os.PathLike | None = None, revision: str | None = None
) -> pathlib.Path:
    """Local path of the weights for timm model `arch.tag`, downloading them into the HF cache if needed.

    Tries `model.safetensors`, then `pytorch_model.bin`. Raises `WeightsUnavailableError` (naming the repo
    and files, and how to provide them) when offline and not cached, on connection errors, or when the repo
    has neither file; `ValueError` for a name without a tag.
    """
    arch, dot, tag = name.partition(".")
    if not arch or not dot or not tag:
        raise ValueError(
            f"timm weights need a tagged name 'arch.tag' (e.g. 'resnet50.a1_in1k'), got {name!r}; the tag picks "
            f"the weights, see https://huggingface.co/timm"
        )
    repo = f"timm/{arch}.{tag}"
    import huggingface_hub
    from huggingface_hub import errors as hf_errors

    tried: list[str] = []
    local_only = False
    for filename in WEIGHT_FILES:
        try:
            local = huggingface_hub.hf_hub_download(
                repo,
                filename,
                cache_dir=cache_dir,
                revision=revision,
                library_name="bob_jax",
                local_files_only=local_only,
            )
            return pathlib.Path(local)
        except (hf_errors.RepositoryNotFoundError, hf_errors.RevisionNotFoundError) as e:
            # Includes GatedRepoError. No other file will help; say which name/revision is wrong.
            raise WeightsUnavailableError(
                f"hub repo {repo} (revision {revision or 'main'}) is not available: {type(e).__name__}. Check "
                f"the timm name {name!r} (timm.list_pretrained() lists them) or log in for gated repos"
            ) from e
        except hf_errors.LocalEntryNotFoundError:
            # Not cached, and offline or unreachable (the hub retries for ~20 s before saying so): look for
            # the other file in the cache only.
            tried.append(f"{filename}: not in the local cache")
            local_only = True
        except hf_errors.EntryNotFoundError:
            tried.append(f"{filename}: not in the repo")
        except Exception as e:
            if not _is_connection_error(e):
                raise
            tried.append(f"{filename}: {type(e).__name__}: {e}")
            local_only = True
    offline = _offline() or bool(
        getattr(getattr(huggingface_hub, "constants", None), "HF_HUB_OFFLINE", False)
    )
    raise _unavailable(repo, tried, offline=offline)
