"""Triton kernels of lorafast and their launchers (installed as ``lorafast.kernels``).

Importing this package compiles nothing, but Triton decides at decoration time
whether kernels are interpreted: set ``TRITON_INTERPRET=1`` before the first
import to run them on CPU tensors. ``lorafast._backend`` takes care of that.
"""
if __name__ == "kernels":
    # Imported as a top-level ``kernels``: Python runs from a source checkout's root (the
    # directory is on sys.path), and someone wants Hugging Face's ``kernels`` package, which
    # transformers imports. Hand them that package rather than shadowing it.
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _spec = importlib.machinery.PathFinder.find_spec(
        "kernels", [p for p in sys.path if os.path.abspath(p or os.curdir) != _root])
    if _spec is None:
        raise ImportError("no module named 'kernels': this directory is lorafast's kernels/ (imported as "
                          "lorafast.kernels), and Hugging Face's kernels package is not installed",
                          name="kernels")
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module
    _spec.loader.exec_module(_module)
