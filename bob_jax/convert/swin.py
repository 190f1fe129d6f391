"""timm Swin v1 / SwinV2 state dicts -> `bob_jax.models.swin` / `bob_jax.models.swinv2`.

The NNX tree mirrors timm's, so the table is near-identity (Linear weight -> kernel transposed,
LayerNorm weight -> scale, conv weight -> HWIO). Two foreign layouts are renamed to timm's first:
- the original Microsoft / timm < 0.9 layout, where PatchMerging sits at the END of stages 0..2
  (`layers.i.downsample` -> `layers.{i+1}.downsample`) and the classifier is `head.*` (-> `head.fc.*`),
  exactly timm's `checkpoint_filter_fn`;
- MiDaS v3.1 DPT checkpoints (`dpt_swin2_tiny_256.pt`, `dpt_swin2_base_384.pt`, ...): the encoder is
  the whole timm 0.6 model under `pretrained.model.` (old layout, see above); the DPT neck/head
  (`scratch.*`, `pretrained.act_postprocess*`) is dropped.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from bob_jax.convert.core import Rule, conv_weight, linear_weight

_LINEAR = r"qkv|proj|fc1|fc2|reduction|fc|cpb_mlp\.[02]"

TIMM_RULES = (
    # timm's non-persistent buffers. They are absent from `model.state_dict()` in timm 1.0.31 but present
    # in checkpoints saved by older timm versions and in the original / MiDaS files (timm's own
    # checkpoint_filter_fn skips them). We recompute each from the config; the test suite checks the
    # recomputed relative_position_index, relative_coords_table, zero k_bias and attn_mask against
    # timm's buffers.
    Rule(r".*\.(?:relative_position_index|relative_coords_table|k_bias)", None),
    Rule(r".*\.attn_mask", None),
    Rule(r"patch_embed\.proj\.weight", "patch_embed.proj.kernel", conv_weight),
    Rule(r"(.*\.(?:relative_position_bias_table|logit_scale|q_bias|v_bias))", r"\1"),
    Rule(rf"(.*(?:{_LINEAR}))\.weight", r"\1.kernel", linear_weight),
    Rule(r"(.*norm\d?)\.weight", r"\1.scale"),
    Rule(r"(.*)\.bias", r"\1.bias"),
)


def is_stage_end_layout(state_dict: Mapping[str, np.ndarray]) -> bool:
    """Original Microsoft / timm < 0.9 layout: stage 0 owns a PatchMerging (timm's test)."""
    return "layers.0.downsample.reduction.weight" in state_dict


def stage_end_to_timm(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """timm `checkpoint_filter_fn`'s rename: layers.i.downsample -> layers.{i+1}.downsample and
    head. -> head.fc."""
    out = {}
    for k, v in state_dict.items():
        k = re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) + 1}.downsample", k)
        if k.startswith("head.") and not k.startswith("head.fc."):
            k = "head.fc." + k[len("head."):]
        out[k] = v
    return out


MIDAS_PREFIX = "pretrained.model."


def is_midas_dpt(state_dict: Mapping[str, np.ndarray]) -> bool:
    return any(k.startswith(MIDAS_PREFIX) for k in state_dict)


def midas_dpt_to_timm(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Keep the encoder (`pretrained.model.*`, a complete timm 0.6 Swin(V2) incl. its final norm and
    the untouched ImageNet classifier `head.*`), drop the DPT neck and depth head (`scratch.*`,
    `pretrained.act_postprocess*`), then rename the stage-end layout to timm's."""
    enc = {k[len(MIDAS_PREFIX):]: v for k, v in state_dict.items() if k.startswith(MIDAS_PREFIX)}
    return stage_end_to_timm(enc) if is_stage_end_layout(enc) else enc


FOREIGN_LAYOUTS = (
    (is_midas_dpt, midas_dpt_to_timm),
    (is_stage_end_layout, stage_end_to_timm),
)


# ----------------------------------------------------------------------------------------------
# v1: relative position bias tables for another (e.g. clamped) window, as timm's checkpoint_filter_fn
# ----------------------------------------------------------------------------------------------


def _gp_positions(src: int, dst: int) -> list[float]:
    """timm `resize_rel_pos_bias_table._calc`: source positions spaced in a geometric progression
    whose ratio q (bisected in [1.01, 1.5]) makes the half-table reach dst // 2."""
    left, right = 1.01, 1.5
    q = (left + right) / 2.0
    while right - left > 1e-6:
        q = (left + right) / 2.0
        gp = (1.0 - q ** (src // 2)) / (1.0 - q)
        if gp > dst // 2:
            right = q
        else:
            left = q
    dis, cur = [], 1
    for i in range(src // 2):
        dis.append(cur)
        cur += q ** (i + 1)
    return [-d for d in reversed(dis)] + [0] + dis


def _interp_linear(points, values: np.ndarray, targets) -> np.ndarray:
    """timm's `RegularGridInterpolator` (linear on an uneven grid, float32, same edge rules)."""
    idxs, dists, overalls = [], [], []
    for p, x in zip(points, targets):
        right = np.searchsorted(p, x, side="left")  # torch.bucketize(x, p), right=False
        right = np.minimum(right, p.shape[0] - 1)
        left = np.clip(right - 1, 0, p.shape[0] - 1)
        dl = np.maximum(x - p[left], np.float32(0))
        dr = np.maximum(p[right] - x, np.float32(0))
        both = (dl == 0) & (dr == 0)
        dl = np.where(both, np.float32(1), dl)
        dr = np.where(both, np.float32(1), dr)
        idxs.append((left, right))
        dists.append((dl, dr))
        overalls.append(dl + dr)
    num = np.float32(0)
    for on in ((0, 0), (0, 1), (1, 0), (1, 1)):
        a = values[idxs[0][on[0]], idxs[1][on[1]]]
        num = num + a * (dists[0][1 - on[0]] * dists[1][1 - on[1]])
    return (num / (overalls[0] * overalls[1])).astype(np.float32)


def resize_rel_pos_bias_table(table: np.ndarray, window: tuple[int, int]) -> np.ndarray:
    """timm `resize_rel_pos_bias_table` for a flat [(2W-1)^2, heads] table from a checkpoint (square
    source window assumed, as timm does) to `window`; the no-scipy (linear) path timm uses by default."""
    dst = (2 * window[0] - 1, 2 * window[1] - 1)
    n_src, heads = table.shape
    s = int(n_src**0.5)
    if s * s == n_src:
        src = (s, s)
    elif n_src == dst[0] * dst[1]:
        src = dst
    else:
        raise ValueError(f"cannot infer the window of a relative position table with {n_src} rows")
    if src == dst:
        return table
    points = (np.asarray(_gp_positions(src[0], dst[0]), np.float32),
              np.asarray(_gp_positions(src[1], dst[1]), np.float32))
    ty, tx = dst[0] // 2, dst[1] // 2
    dy = np.arange(-ty, ty + 0.1, 1.0, dtype=np.float32)
    dx = np.arange(-tx, tx + 0.1, 1.0, dtype=np.float32)
    grid = np.meshgrid(dy, dx, indexing="ij")
    cols = [_interp_linear(points, table[:, h].reshape(src).astype(np.float32), grid).reshape(-1, 1)
            for h in range(heads)]
    return np.concatenate(cols, axis=-1).astype(table.dtype)


_TABLE = re.compile(r"layers\.(\d+)\.blocks\.(\d+)\.attn\.relative_position_bias_table")


def adapt_v1(state_dict: Mapping[str, np.ndarray], cfg) -> dict[str, np.ndarray]:
    """Resize every v1 relative position bias table whose size differs from the model's (clamped)
    window at `cfg.img_size`, as timm's `checkpoint_filter_fn` does (e.g. 224-px weights at 64 px)."""
    from bob_jax.models.swin import block_geometry

    geometry = block_geometry(cfg)
    out = dict(state_dict)
    for k, v in state_dict.items():
        m = _TABLE.fullmatch(k)
        if m is None:
            continue
        i, b = int(m.group(1)), int(m.group(2))
        if i >= len(geometry) or b >= len(geometry[i]):
            continue  # accounting reports it
        window = geometry[i][b][0]
        if np.shape(v)[0] != (2 * window[0] - 1) * (2 * window[1] - 1):
            out[k] = resize_rel_pos_bias_table(np.asarray(v), window)
    return out
