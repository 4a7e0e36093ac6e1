"""Triton kernels of lorafast and their launchers (installed as ``lorafast.kernels``).

Importing this package compiles nothing, but Triton decides at decoration time
whether kernels are interpreted: set ``TRITON_INTERPRET=1`` before the first
import to run them on CPU tensors. ``lorafast._backend`` takes care of that.
"""
