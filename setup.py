"""Build the optional CUDA extension (lorafast._C) ahead of time.

It is built only when torch with CUDA and nvcc are present, csrc/ holds CUDA
sources, and LORAFAST_SKIP_CUDA_BUILD is unset. Otherwise this is a plain
Python install and ``backend="cuda"`` compiles on first use (lorafast/_cuda.py).
Under pip's build isolation torch is absent, so use
``pip install --no-build-isolation .`` to build the extension ahead of time.
LORAFAST_CUDA_ARCHS (default "80;90a") picks the architectures and MAX_JOBS the
parallel compile jobs (read by torch's BuildExtension). csrc/checks/ holds
compile checks only and is not built.
"""
import glob
import os
import shutil

from setuptools import setup


def cuda_extension():
    if os.environ.get("LORAFAST_SKIP_CUDA_BUILD"):
        return None
    sources = sorted(glob.glob("csrc/*.cu") + glob.glob("csrc/*.cpp"))
    if not sources or shutil.which("nvcc") is None:
        return None
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except ImportError:
        return None
    if torch.version.cuda is None:
        return None
    archs = os.environ.get("LORAFAST_CUDA_ARCHS", "80;90a").split(";")
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs if a]
    ext = CUDAExtension("lorafast._C", sources, include_dirs=[os.path.abspath("csrc")],
                        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", *gencode]})
    return ext, BuildExtension


found = cuda_extension()
setup(ext_modules=[found[0]] if found else [], cmdclass={"build_ext": found[1]} if found else {})
