"""Builds prefix_attn._C: the C++ CPU kernels always, the CUDA kernels when they can be built.

Environment flags:
  PREFIX_ATTN_CUDA=auto|0|1   build the CUDA sources under csrc/cuda: auto (default) when torch
                              has CUDA and nvcc is found, 0 never, 1 always (fails without nvcc)
  PREFIX_ATTN_CUDA_ARCHS      architectures, default "8.0;9.0+PTX" (TORCH_CUDA_ARCH_LIST form)
  PREFIX_ATTN_CPU_ARCH        -march for the CPU kernels, default "native"; "" for a portable build
"""
import glob
import os
import shutil

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, CUDA_HOME
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def want_cuda() -> bool:
    flag = os.environ.get("PREFIX_ATTN_CUDA", "auto").lower()
    cuda_sources = glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cu"))
    if flag in ("0", "false", "no") or not cuda_sources:
        return False
    have = torch.version.cuda is not None and (CUDA_HOME is not None or shutil.which("nvcc"))
    if flag in ("1", "true", "yes"):
        if not have:
            raise RuntimeError("PREFIX_ATTN_CUDA=1, but torch has no CUDA or nvcc was not found")
        return True
    return bool(have)


# The glue takes the CUDA stream through c10's generic guard interface, so no symbol of ours comes
# from libc10_cuda, and the linker's --as-needed (the default of Debian's and Ubuntu's gcc) would
# drop it. Kept as a DT_NEEDED: loading the extension loads the library that implements CUDA
# streams, or fails naming it. tools/cuda_link_check.sh checks the result against a CUDA torch.
CUDA_LINK_ARGS = ["-Wl,--push-state,--no-as-needed", "-lc10_cuda", "-Wl,--pop-state"]


def extension():
    cpu_arch = os.environ.get("PREFIX_ATTN_CPU_ARCH", "native")
    # -fopenmp: at::parallel_for is an inline `#pragma omp parallel` in PyTorch's OpenMP builds,
    # so without it our loops run on one thread. libgomp resolves to the copy torch loaded.
    cxx = ["-O3", "-fopenmp", "-fno-math-errno"]
    if cpu_arch:
        cxx.append(f"-march={cpu_arch}")
    sources = ["csrc/prefix_attn_api.cpp", "csrc/cpu/prefix_attn_cpu.cpp"]
    if not want_cuda():
        return CppExtension("prefix_attn._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", os.environ.get("PREFIX_ATTN_CUDA_ARCHS", "8.0;9.0+PTX"))
    sources += sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cu")))
    sources += sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cpp")))
    return CUDAExtension(
        "prefix_attn._C",
        sources,
        define_macros=[("PREFIX_ATTN_WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]},
        extra_link_args=["-fopenmp"] + CUDA_LINK_ARGS,
    )


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
