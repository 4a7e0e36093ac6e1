"""Build the torch binding of csrc/ for real, on a machine without a GPU or a CUDA torch.

The CPU build of torch cannot build the extension: it has no CUDA libraries, and its headers
are not the CUDA build's. This script takes both from the CUDA build's own wheel (downloaded
once with pip, ``torch===VERSION``; only torch/include and five libraries are unpacked), and the
CUDA runtime headers and libcudart from the machine's nvcc. It then builds the extension the way
torch.utils.cpp_extension's CUDAExtension does (its nvcc flags, C++20, the C++11 ABI, sm_80 and
sm_90a) and links it with ``-z defs`` against libtorch, libtorch_cuda and libc10(_cuda), so a
call into torch that the libraries do not export fails too.

cuBLAS, cuSPARSE and cuSOLVER ship in wheels of their own. torch's CUDA headers only name their
handle and status types, so ``stubs/`` declares those types and nothing else; no code here or
in torch's headers that this build compiles calls into them.

    python csrc/checks/build_binding.py [--torch 2.13.0] [--wheel PATH] [--build DIR]
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
LIBS = ("libc10.so", "libc10_cuda.so", "libtorch.so", "libtorch_cpu.so", "libtorch_cuda.so")
ARCHS = ("80", "90a")

# the types torch's CUDA headers (ATen/cuda/CUDAContextLight.h, Exceptions.h) name
STUBS = {
    "cublas_v2.h": "typedef struct cublasContext* cublasHandle_t;\n"
                   "typedef enum { CUBLAS_STATUS_SUCCESS = 0 } cublasStatus_t;\n",
    "cublasLt.h": "typedef struct cublasLtContext* cublasLtHandle_t;\n",
    "cusparse.h": "typedef struct cusparseContext* cusparseHandle_t;\n"
                  "typedef enum { CUSPARSE_STATUS_SUCCESS = 0 } cusparseStatus_t;\n"
                  "const char* cusparseGetErrorString(cusparseStatus_t status);\n",
    "cusolver_common.h": "typedef enum { CUSOLVER_STATUS_SUCCESS = 0 } cusolverStatus_t;\n",
    "cusolverDn.h": "#include \"cusolver_common.h\"\n"
                    "typedef struct cusolverDnContext* cusolverDnHandle_t;\n",
}


def log(msg: str) -> None:
    print(f"binding-check: {msg}", flush=True)


def run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"binding-check: FAILED: {' '.join(cmd[:3])} … (exit {proc.returncode})")


def cuda_home() -> Path:
    """The CUDA toolkit of the machine's nvcc (CUDA_HOME, /usr/local/cuda, or nvcc's own folder)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    for c in candidates:
        if c and (Path(c) / "include" / "cuda_runtime_api.h").exists():
            return Path(c)
    raise SystemExit("binding-check: no CUDA toolkit with cuda_runtime_api.h found (set CUDA_HOME)")


def fetch_wheel(version: str, dest: Path) -> Path:
    found = sorted(dest.glob(f"torch-{version}-*.whl"))
    if not found:
        log(f"downloading the CUDA build of torch {version} (pip download, no dependencies)")
        # === matches the version string exactly: never a local build such as 2.13.0+cpu
        run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
             "--dest", str(dest), f"torch==={version}"])
        found = sorted(dest.glob(f"torch-{version}-*.whl"))
    if not found:
        raise SystemExit(f"binding-check: pip gave no torch {version} wheel in {dest}")
    return found[0]


def unpack(wheel: Path, dest: Path) -> Path:
    """torch/include and the libraries the extension links against; returns dest/torch."""
    marker = dest / ".unpacked"
    if marker.exists() and marker.read_text() == wheel.name:
        return dest / "torch"
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        if "torch/lib/libtorch_cuda.so" not in names:
            raise SystemExit(f"binding-check: {wheel.name} is not a CUDA build of torch (no libtorch_cuda.so)")
        wanted = [n for n in names if n.startswith("torch/include/")] + [f"torch/lib/{lib}" for lib in LIBS]
        z.extractall(dest, wanted + ["torch/version.py"])
    marker.write_text(wheel.name)
    return dest / "torch"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--torch", default="2.13.0", help="the torch release whose CUDA build to build against")
    ap.add_argument("--wheel", type=Path, help="a CUDA torch wheel already on disk (skips the download)")
    ap.add_argument("--build", type=Path, default=ROOT / "build" / "binding-check", help="work folder")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    work = args.build / f"torch-{args.torch}"
    work.mkdir(parents=True, exist_ok=True)
    wheel = args.wheel or fetch_wheel(args.torch, args.build)
    torch_dir = unpack(wheel, work)
    cuda = cuda_home()
    stubs = work / "stubs"
    stubs.mkdir(exist_ok=True)
    for name, text in STUBS.items():
        (stubs / name).write_text("#pragma once\n// declarations only: the library ships in a wheel of its own\n"
                                  + text)
    version = re.search(r"__version__ = '([^']+)'", (torch_dir / "version.py").read_text())
    log(f"{wheel.name} (torch {version.group(1) if version else '?'}), CUDA toolkit {cuda}")

    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS   # the same torch release's own flags
    defines = ["-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C", "-D_GLIBCXX_USE_CXX11_ABI=1"]
    includes = [f"-I{CSRC}", f"-I{torch_dir / 'include'}", f"-I{torch_dir / 'include/torch/csrc/api/include'}",
                f"-I{cuda / 'include'}", f"-I{stubs}"]
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    objects = []
    for src in sorted(CSRC.glob("*.cu")) + sorted(CSRC.glob("*.cpp")):
        obj = work / f"{src.stem}.o"
        if src.suffix == ".cu":
            cmd = [str(cuda / "bin" / "nvcc"), "-c", str(src), "-o", str(obj), *includes, *COMMON_NVCC_FLAGS,
                   "--compiler-options", "-fPIC", "-O3", "-std=c++20", *defines, *gencode]
        else:
            cmd = [os.environ.get("CXX", "g++"), "-c", str(src), "-o", str(obj), *includes, "-fPIC", "-O3",
                   "-std=c++20", *defines]
        t = time.perf_counter()
        run(cmd)
        log(f"compiled {src.relative_to(ROOT)} ({time.perf_counter() - t:.0f} s)")
        objects.append(str(obj))
    so = work / "lorafast_C.so"
    run([os.environ.get("CXX", "g++"), "-shared", *objects, "-o", str(so), f"-L{torch_dir / 'lib'}",
         f"-L{cuda / 'lib64'}", f"-L{cuda / 'lib'}", "-lc10", "-lc10_cuda", "-ltorch", "-ltorch_cpu",
         "-ltorch_cuda", "-lcudart", "-Wl,-z,defs"])
    log(f"linked {so} ({so.stat().st_size // 1024} KiB) against torch {args.torch}'s CUDA libraries: "
        f"OK in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
