"""How ops view their tensors: the rows that privatize clips.

Shared by the reference, the plans and the fake kernels; it depends on shapes only.
"""
from __future__ import annotations

import math

PRIVATIZE_MODES = ("sample", "token", "element")


def privatize_rows(shape, mode: str) -> tuple[int, int]:
    """(R, L): the R rows of L contiguous elements whose L2 norm privatize clips, for a tensor
    (or a shape). "sample": one row per sample (B, rest); "token": one per vector along the
    last dim; "element" clips elements, any split (rows of the last dim)."""
    shape = tuple(getattr(shape, "shape", shape))
    numel = math.prod(shape)
    L = shape[-1] if mode in ("token", "element") else math.prod(shape[1:])
    return (numel // L if L else 0), L
