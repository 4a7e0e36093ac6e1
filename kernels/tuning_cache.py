"""Autotune results kept across processes, for a Triton without ``cache_results``.

Triton ≥ 3.3 stores the winning config of ``triton.autotune(..., cache_results=True)`` in
its own cache, and lorafast uses that where it exists. Older versions re-benchmark every
config in every process. ``cached_autotune`` is then a drop-in for ``triton.autotune``
that keeps the winners in one JSON file per kernel under ``$LORAFAST_CACHE_DIR`` (default
``~/.cache/lorafast``)/autotune, keyed like Triton's: the key arguments' values and the
tensor arguments' dtypes. The file name hashes what makes a result stale: the kernel's
source, the config list, the Triton version and the GPU.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Optional

import triton


def cache_dir() -> Path:
    root = os.environ.get("LORAFAST_CACHE_DIR") or Path.home() / ".cache" / "lorafast"
    return Path(root) / "autotune"


def _describe(cfg: triton.Config) -> dict:
    return {"kwargs": dict(cfg.kwargs), "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


class CachedAutotuner:
    """``tuner[grid](*args, **kwargs)`` as Triton's autotuner, with results on disk."""

    def __init__(self, fn, tuner, configs: list, key: list[str], device_name: str = ""):
        self.fn, self.tuner, self.key = fn, tuner, list(key)
        self.configs = configs
        src = getattr(fn, "src", None) or repr(fn)
        blob = json.dumps([src, [_describe(c) for c in configs], self.key, triton.__version__, device_name],
                          sort_keys=True, default=str)
        name = getattr(fn, "__name__", "kernel")
        self.path = cache_dir() / f"{name}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}.json"
        self._memo: Optional[dict[str, dict]] = None

    def _entries(self) -> dict[str, dict]:
        if self._memo is None:
            try:
                self._memo = json.loads(self.path.read_text())
            except (OSError, ValueError):
                self._memo = {}
        return self._memo

    def key_of(self, named: dict[str, Any]) -> str:
        values = [str(named.get(k)) for k in self.key]
        dtypes = [str(v.dtype) for v in named.values() if hasattr(v, "dtype")]
        return "|".join(values + dtypes)

    def _store(self, key: str, cfg: triton.Config) -> None:
        entries = self._entries()
        entries[key] = _describe(cfg)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entries, indent=1, sort_keys=True))
        tmp.replace(self.path)    # atomic: concurrent processes never read half a file

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.run(*args, grid=grid, **kwargs)

    def run(self, *args, grid, **kwargs):
        named = {**dict(zip(self.fn.arg_names, args)), **kwargs}
        key = self.key_of(named)
        hit = self._entries().get(key)
        if hit is None:
            out = self.tuner[grid](*args, **kwargs)
            self._store(key, self.tuner.best_config)
            return out
        return self.fn[grid](*args, **kwargs, **hit["kwargs"], num_warps=hit["num_warps"],
                             num_stages=hit["num_stages"])


def cached_autotune(configs: list, key: list[str], **kw):
    """Decorator: ``triton.autotune(configs, key, **kw)`` with its results cached on disk."""
    def wrap(fn):
        import torch
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
        return CachedAutotuner(fn, triton.autotune(configs=configs, key=key, **kw)(fn), configs, key, device)
    return wrap
