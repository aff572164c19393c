"""Population responses as typed binary arrays: one row per trial, the vector as raw bytes.

A JSON list of 1,000 floats per trial is ~20 kB of text to parse; the same vector as float64
bytes is 8 kB and decodes with one ``numpy.frombuffer``. The bytes are little-endian on every
backend (BLOB on SQLite, BYTEA on PostgreSQL); NaN marks a masked unit. float32 input stays
float32 (half the size); anything else is stored as float64, which holds every count and every
float64 response exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from orchestrator.store.errors import StoreError

if TYPE_CHECKING:
    import numpy as np

#: The largest population a trial may carry (a Neuropixels 2.0 probe records ~5,000 channels).
MAX_UNITS = 100_000


@dataclass(frozen=True)
class EncodedPopulation:
    """A population vector ready for the ``population_responses`` row."""

    data: bytes
    dtype: str
    n_units: int
    n_masked: int


def is_population(value: Any) -> bool:
    """True for a numpy vector value (a population response), False for a scalar or None."""
    return hasattr(value, "ndim") and getattr(value, "ndim", 0) >= 1


def encode(value: Any) -> EncodedPopulation:
    """Validate a 1-D numeric vector and pack it; NaN units are counted as masked."""
    import numpy as np

    arr = np.asarray(value)
    if arr.ndim != 1:
        raise StoreError(f"population response must be a 1-D vector, got shape {arr.shape}")
    if arr.size == 0 or arr.size > MAX_UNITS:
        raise StoreError(f"population response has {arr.size} units; 1..{MAX_UNITS} are storable")
    if arr.dtype.kind not in "fiub":
        raise StoreError(f"population response must be numeric, got dtype {arr.dtype}")
    kind = "float32" if arr.dtype == np.float32 else "float64"
    arr = arr.astype("<f4" if kind == "float32" else "<f8", copy=False)
    if np.isinf(arr).any():
        unit = int(np.flatnonzero(np.isinf(arr))[0])
        raise StoreError(f"population response unit {unit} is infinite")
    return EncodedPopulation(arr.tobytes(), kind, int(arr.size), int(np.isnan(arr).sum()))


def decode(data: bytes, dtype: str) -> "np.ndarray":
    """The stored vector as a read-only numpy array of its stored dtype."""
    import numpy as np

    return np.frombuffer(data, dtype="<f4" if dtype == "float32" else "<f8")
