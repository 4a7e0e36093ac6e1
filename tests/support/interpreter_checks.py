"""Checks of the hardware contract that the Triton interpreter itself skips.

On a GPU a compiler hint is a promise the compiler builds on: ``tl.multiple_of`` (divisibility),
``tl.max_contiguous`` and ``tl.max_constancy`` decide vector widths and alignment, and a false
one gives misaligned or wrong loads. Signed 32-bit index arithmetic wraps around on a GPU (the
interpreter's numpy wraps too, and the load then reads a wild address). Under the interpreter
neither shows, so ``checking()`` verifies both on the actual values while kernels run:

- ``max_contiguous(x, c)``: along each dim, every aligned group of c elements is a run x, x+1, …
- ``max_constancy(x, c)``: along each dim, every aligned group of c elements is one value.
- ``multiple_of(x, d)``: along each dim, the first element of every aligned group of the size the
  compiler may assume (the longest aligned run or constant group the values really have, at
  least 1) is divisible by d, in elements for integers and in bytes for pointers. That is
  the meaning of Triton's divisibility ("of the first element of each contiguous group").
- signed int32 add, sub and mul: no result leaves the int32 range.

A failed check raises ``ContractViolation`` naming the promise and the offending values; the
interpreter reports it as the kernel's error.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np

HINTS = {"tt.divisibility": "multiple_of", "tt.contiguity": "max_contiguous", "tt.constancy": "max_constancy"}
_INT32_OPS = {"create_add": np.add, "create_sub": np.subtract, "create_mul": np.multiply}


class ContractViolation(AssertionError):
    """A Triton kernel broke a compiler hint or overflowed signed 32-bit index arithmetic."""


def _steps_hold(arr: np.ndarray, dim: int, size: int, step: int) -> bool:
    """Within every aligned group of ``size`` along ``dim`` (a shorter last group included), each
    element is the previous one plus ``step``."""
    n = arr.shape[dim]
    if n < 2 or size < 2:
        return True
    inside = (np.arange(1, n) % size) != 0      # i and i+1 in the same group
    d = np.diff(arr, axis=dim)
    return bool((np.compress(inside, d, axis=dim) == step).all())


def _longest_group(arr: np.ndarray, dim: int, step: int) -> int:
    """The largest power of two c ≤ the dim whose aligned groups all step by ``step``."""
    c = 1
    while c * 2 <= arr.shape[dim] and _steps_hold(arr, dim, c * 2, step):
        c *= 2
    return c


def check_hint(name: str, data, values, elem_bytes: int = 0) -> None:
    """Check one hint on the values it was given; ``elem_bytes`` > 0 marks a pointer tensor
    (divisibility in bytes, contiguity in elements of that size)."""
    hint = HINTS[name]
    arr = np.asarray(data).astype(np.int64)
    arr = arr.reshape(arr.shape or (1,))
    values = [int(v) for v in values]
    if len(values) != arr.ndim:
        raise ContractViolation(f"tl.{hint}: {len(values)} values for a {arr.ndim}-d tensor")
    step = elem_bytes or 1
    for dim, v in enumerate(values):
        if v <= 0:
            raise ContractViolation(f"tl.{hint}: value {v} along dim {dim} is not positive")
        if name == "tt.contiguity" and not _steps_hold(arr, dim, v, step):
            raise ContractViolation(f"tl.max_contiguous(x, {v}) is false along dim {dim}: an aligned group "
                                    f"of {v} is not a run of consecutive values ({_show(arr, dim)})")
        if name == "tt.constancy" and not _steps_hold(arr, dim, v, 0):
            raise ContractViolation(f"tl.max_constancy(x, {v}) is false along dim {dim}: an aligned group "
                                    f"of {v} holds different values ({_show(arr, dim)})")
        if name == "tt.divisibility":
            group = max(_longest_group(arr, dim, step), _longest_group(arr, dim, 0))
            firsts = np.take(arr, np.arange(0, arr.shape[dim], group), axis=dim)
            bad = firsts[firsts % v != 0]
            if bad.size:
                unit = "bytes" if elem_bytes else "elements"
                raise ContractViolation(
                    f"tl.multiple_of(x, {v}) is false along dim {dim}: the first element of an aligned "
                    f"group of {group} is {int(bad.flat[0])}, not a multiple of {v} ({unit}; {_show(arr, dim)})")


def _show(arr: np.ndarray, dim: int, n: int = 40) -> str:
    line = np.moveaxis(arr, dim, -1).reshape(-1, arr.shape[dim])[0]
    return "values " + " ".join(map(str, line[:n].tolist())) + (" …" if line.size > n else "")


@contextlib.contextmanager
def checking() -> Iterator[None]:
    """Check every hint and every signed int32 add/sub/mul of interpreted kernels in this block."""
    from triton.runtime import interpreter

    handle_cls = interpreter.TensorHandle
    builder_cls = interpreter.InterpreterBuilder
    for owner, attr in [(handle_cls, "set_attr"), *[(builder_cls, op) for op in _INT32_OPS]]:
        if not hasattr(owner, attr):   # a Triton whose interpreter is laid out differently
            raise RuntimeError(f"interpreter checks: triton.runtime.interpreter.{owner.__name__}.{attr} "
                               f"is missing in this Triton; update tests/support/interpreter_checks.py")
    set_attr = handle_cls.set_attr
    originals = {op: getattr(builder_cls, op) for op in _INT32_OPS}

    def checked_set_attr(self, key, value):
        if key in HINTS:
            elem = max(1, self.dtype.element_ty.primitive_bitwidth // 8) if self.dtype.is_ptr() else 0
            check_hint(key, self.data, value, elem)
        return set_attr(self, key, value)

    def checked(op, np_op):
        original = originals[op]

        def run(self, lhs, rhs):
            out = original(self, lhs, rhs)
            if lhs.data.dtype == np.int32 and rhs.data.dtype == np.int32:
                wide = np_op(lhs.data.astype(np.int64), rhs.data.astype(np.int64))
                if not np.array_equal(wide, out.data):
                    i = np.flatnonzero(wide.ravel() != np.asarray(out.data).ravel())[0]
                    raise ContractViolation(
                        f"signed int32 overflow in {op.removeprefix('create_')}: the exact result "
                        f"{int(wide.ravel()[i])} wraps to {int(np.asarray(out.data).ravel()[i])}; "
                        f"compute this index in int64")
            return out
        return run

    handle_cls.set_attr = checked_set_attr
    for op, np_op in _INT32_OPS.items():
        setattr(builder_cls, op, checked(op, np_op))
    try:
        yield
    finally:
        handle_cls.set_attr = set_attr
        for op, fn in originals.items():
            setattr(builder_cls, op, fn)
