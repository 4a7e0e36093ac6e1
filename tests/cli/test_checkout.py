"""Python started in the source checkout's root (the checkout on sys.path, as `python -m`,
notebooks, Ray and Flower's simulation do) still finds Hugging Face's `kernels` package, which
transformers imports, rather than lorafast's kernels/ directory."""
import importlib.metadata
import subprocess
import sys

import pytest

from support.common import ROOT


def test_a_top_level_kernels_import_from_the_checkout_gets_hugging_faces_package():
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's kernels package is not installed")
    code = ("import kernels, lorafast.kernels as ours; from transformers import LlamaConfig; "
            "print(kernels.__file__); print(ours.__file__)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs, ours = proc.stdout.split()
    assert theirs != ours and not theirs.startswith(str(ROOT / "kernels"))
