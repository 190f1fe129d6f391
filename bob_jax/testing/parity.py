"""The one parity measure used everywhere: max |flax - reference| / max(1, max |reference|)."""

from __future__ import annotations

import numpy as np

DEFAULT_TOLERANCE = 1e-4


def parity_error(flax_out, reference) -> float:
    """Max absolute difference, relative to the reference's magnitude once it exceeds 1."""
    f = np.asarray(flax_out, dtype=np.float64)
    r = np.asarray(reference, dtype=np.float64)
    if f.shape != r.shape:
        raise ValueError(f"shape mismatch: flax {f.shape} vs reference {r.shape}")
    return float(np.max(np.abs(f - r)) / max(1.0, float(np.max(np.abs(r)))))


def assert_parity(flax_out, reference, tol: float = DEFAULT_TOLERANCE, what: str = "output") -> float:
    err = parity_error(flax_out, reference)
    if not err <= tol:  # also catches NaN
        raise AssertionError(f"{what}: parity error {err:.3e} exceeds {tol:.0e}")
    return err
