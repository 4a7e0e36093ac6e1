"""Automatic choice between the GPU kernel backends ("hybrid", "triton", "cuda") from
measured timings, per op, GPU, dtype and shape.

The benchmarks (bench/bench_lora_linear.py, bench/bench_noise.py) time the backends on
the same inputs and record each shape's medians in a table: the user's, at
``$LORAFAST_BACKEND_TABLE`` or ``<cache>/backend_table.json`` (cache: ``$LORAFAST_CACHE_DIR``
or ``~/.cache/lorafast``), read together with any tables shipped in ``lorafast/tuning/``.
An op asks for the entry of its GPU, op and dtype whose shape is nearest (in log scale) to
its own and takes that entry's fastest backend. With no entry it keeps the default
(lorafast._backend: "hybrid" for the LoRA linear, "triton" for the other ops).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Optional, Sequence

_PACKAGED = Path(__file__).resolve().parent / "tuning"
_cache: Optional[dict] = None


def user_table_path() -> Path:
    env = os.environ.get("LORAFAST_BACKEND_TABLE")
    if env:
        return Path(env)
    root = Path(os.environ.get("LORAFAST_CACHE_DIR", Path.home() / ".cache" / "lorafast"))
    return root / "backend_table.json"


def _read(path: Path) -> list[dict]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    return [e for e in data.get("entries", []) if isinstance(e, dict)]


def _index() -> dict:
    """{(gpu, op, dtype): [(shape, {backend: ms})]} from the shipped tables, then the user's."""
    global _cache
    if _cache is None:
        _cache = {}
        paths = sorted(_PACKAGED.glob("*.json")) + [user_table_path()]
        for path in paths:
            for e in _read(path):
                try:
                    key = (str(e["gpu"]), str(e["op"]), str(e["dtype"]))
                    item = (tuple(int(v) for v in e["shape"]), {str(k): float(v) for k, v in e["ms"].items()})
                except (KeyError, TypeError, ValueError):
                    continue
                _cache.setdefault(key, []).append(item)
    return _cache


def _distance(a: Sequence[int], b: Sequence[int]) -> float:
    return sum(abs(math.log(max(x, 1) / max(y, 1))) for x, y in zip(a, b))


def nearest(gpu: str, op: str, dtype: str, shape: Sequence[int], candidates: Sequence[str],
            must: Sequence[str] = ()) -> Optional[tuple[tuple[int, ...], dict[str, float]]]:
    """(shape, {backend: ms}) of the recorded entry nearest to ``shape`` among those that time
    at least two of ``candidates`` (only those are returned) and every backend in ``must``
    (the default, which a choice must have been measured against), or None."""
    entries = []
    for s, ms in _index().get((gpu, op, dtype), ()):
        timed = {c: ms[c] for c in candidates if c in ms}
        if len(s) == len(shape) and len(timed) >= min(2, len(candidates)) and all(m in timed for m in must):
            entries.append((s, timed))
    if not entries:
        return None
    return min(entries, key=lambda e: _distance(e[0], shape))


def fastest(gpu: str, op: str, dtype: str, shape: Sequence[int], candidates: Sequence[str]) -> Optional[str]:
    """The measured-fastest of ``candidates`` at the nearest recorded shape, or None."""
    found = nearest(gpu, op, dtype, shape, candidates)
    if found is None:
        return None
    ms = found[1]
    return min(ms, key=ms.get)


def shape_count() -> int:
    """How many measured shapes the shipped and user tables hold together."""
    return sum(len(v) for v in _index().values())


def record(gpu: str, op: str, dtype: str, shape: Sequence[int], ms: dict[str, float],
           path: Optional[Path] = None) -> Path:
    """Add (or replace) one measured entry in the user's table; returns the table's path."""
    global _cache
    path = Path(path) if path is not None else user_table_path()
    entries = [e for e in _read(path) if not (e.get("gpu") == gpu and e.get("op") == op and e.get("dtype") == dtype
                                              and list(e.get("shape", ())) == list(shape))]
    entries.append({"gpu": gpu, "op": op, "dtype": dtype, "shape": [int(v) for v in shape],
                    "ms": {k: float(v) for k, v in ms.items()}})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"entries": entries}, indent=1) + "\n")
    tmp.replace(path)
    _cache = None
    return path
