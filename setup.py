"""Builds prefix_attn, with its C++ extension prefix_attn._C compiled ahead of install where it can.

Where torch is importable at build time (`pip install --no-build-isolation`, `make install`), the
extension is compiled here against that torch: the CPU kernels once per ISA level (AVX-512, AVX2,
baseline x86-64; prefix_attn/_build.py), the CUDA kernels when torch has CUDA and nvcc is found.
The package then requires that torch version. Where torch is not importable (pip's default
build isolation, whose environment has no torch), or no compiler works, the package is pure
Python, and prefix_attn compiles the CPU kernels for this machine at first use (prefix_attn/_ops.py),
cached per torch version and ISA level. The C++ sources ship inside the package for that.

Environment flags:
  PREFIX_ATTN_BUILD=auto|ahead|first-use   auto (default): ahead when torch imports here, and
                              first-use if the compile fails; ahead: fail when it cannot compile;
                              first-use: never compile here
  PREFIX_ATTN_CUDA=auto|0|1   build the CUDA sources under csrc/cuda: auto (default) when torch
                              has CUDA and nvcc is found, 0 never, 1 always (fails without nvcc)
  PREFIX_ATTN_CUDA_ARCHS      architectures, default "8.0;9.0+PTX" (TORCH_CUDA_ARCH_LIST form)
  PREFIX_ATTN_CPU_ARCH        unset (default): the portable ISA levels with runtime dispatch;
                              "native" (or another -march value): one level for this CPU only
"""
import concurrent.futures
import glob
import importlib.util
import os
import shutil
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


def _load_build_description():
    spec = importlib.util.spec_from_file_location("_prefix_attn_build", os.path.join(HERE, "prefix_attn", "_build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


B = _load_build_description()


def note(message: str) -> None:
    print(f"prefix_attn setup: {message}", file=sys.stderr, flush=True)


class BuildPyWithSources(build_py):
    """Ships csrc/ inside the package (prefix_attn/_csrc), for the build at first use."""

    def run(self):
        super().run()
        target = os.path.join(self.build_lib, "prefix_attn", "_csrc")
        for pattern in B.SOURCE_GLOBS + ["cuda/*"]:
            for path in glob.glob(os.path.join(HERE, "csrc", pattern)):
                rel = os.path.relpath(path, os.path.join(HERE, "csrc"))
                os.makedirs(os.path.dirname(os.path.join(target, rel)), exist_ok=True)
                shutil.copyfile(path, os.path.join(target, rel))


def build_mode() -> str:
    mode = os.environ.get("PREFIX_ATTN_BUILD", "auto").strip().lower() or "auto"
    if mode not in ("auto", "ahead", "first-use"):
        raise SystemExit(f"PREFIX_ATTN_BUILD must be auto, ahead or first-use, got {mode!r}")
    return mode


def compiler_missing():
    """Why no C++ compiler can run here, or None."""
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx.split()[0]) is None:
        return f"no C++ compiler: {cxx!r} (the CXX variable, else c++) was not found"
    return None


def want_cuda(torch) -> bool:
    from torch.utils.cpp_extension import CUDA_HOME

    flag = os.environ.get("PREFIX_ATTN_CUDA", "auto").lower()
    cuda_sources = glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cu"))
    if flag in ("0", "false", "no") or not cuda_sources:
        return False
    # Never against a CPU-only torch: the result would need libc10_cuda, which that torch lacks.
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


def extension(torch):
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    arch = B.cpu_arch_override()
    levels = B.levels(arch)
    cxx = B.CXX_FLAGS + B.common_flags(arch) + [f"-D{B.level_define(level)}" for level in levels]
    sources = [f"csrc/{s}" for s in B.COMMON_SOURCES]
    if not want_cuda(torch):
        ext = CppExtension("prefix_attn._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=B.LINK_FLAGS)
    else:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", os.environ.get("PREFIX_ATTN_CUDA_ARCHS", "8.0;9.0+PTX"))
        sources += sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cu")))
        sources += sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cpp")))
        ext = CUDAExtension(
            "prefix_attn._C",
            sources,
            define_macros=[("PREFIX_ATTN_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=B.LINK_FLAGS + CUDA_LINK_ARGS,
        )
    ext.prefix_attn_levels = levels
    return ext


def build_ext_class(mode: str):
    from torch.utils.cpp_extension import BuildExtension

    class Build(BuildExtension.with_options(use_ninja=True)):
        def run(self):
            if mode == "auto" and compiler_missing():
                note(f"{compiler_missing()}; installing without the compiled extension "
                     f"(prefix_attn compiles its CPU kernels at first use once a compiler is there)")
                return
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001  (whatever the toolchain raises)
                if mode != "auto":
                    raise
                first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
                note(f"compiling the extension failed ({first}); installing without it "
                     f"(prefix_attn compiles its CPU kernels at first use, or says why it cannot)")

        def build_extension(self, ext):
            # The kernel file is compiled once per level, each with its own flags, which one
            # extension's sources cannot have: those objects are compiled here, through the same
            # ninja-backed compiler BuildExtension set up, one build directory per level (so the
            # levels compile in parallel), and linked in.
            levels = getattr(ext, "prefix_attn_levels", None)
            if levels:
                flags = B.CXX_FLAGS + ["-std=c++20"]
                include_dirs = list(ext.include_dirs) + [os.path.join(HERE, "csrc")]

                def compile_level(item):
                    level, level_flags = item
                    objects = self.compiler.compile(
                        [f"csrc/{B.level_source(level)}"], output_dir=os.path.join(self.build_temp, "isa", level),
                        include_dirs=include_dirs, extra_postargs={"cxx": flags + level_flags, "nvcc": []})
                    return [B.isolate_level_object(o, level) for o in objects] if len(levels) > 1 else objects

                with concurrent.futures.ThreadPoolExecutor(len(levels)) as pool:
                    objects = [o for objs in pool.map(compile_level, levels.items()) for o in objs]
                ext.extra_objects = list(ext.extra_objects or []) + objects
            super().build_extension(ext)

    return Build


def main():
    mode = build_mode()
    torch = None
    if mode != "first-use":
        try:
            import torch
        except ImportError:
            if mode == "ahead":
                raise SystemExit("PREFIX_ATTN_BUILD=ahead needs torch importable at build time: install torch first, "
                                 "then pip install --no-build-isolation .")
    cmdclass = {"build_py": BuildPyWithSources}
    if torch is None:
        note("torch is not importable here (pip's build isolation?): building a pure-Python package; "
             "the CPU kernels are compiled at first use")
        # ninja: torch.utils.cpp_extension.load needs it for that build
        setup(cmdclass=cmdclass, install_requires=["torch>=2.5", "ninja"])
        return
    public_torch = torch.__version__.split("+")[0]
    cmdclass["build_ext"] = build_ext_class(mode)
    # The binary is tied to the torch it is built against (its C++ ABI); ninja for the build at
    # first use, should the compile here fail.
    setup(ext_modules=[extension(torch)], cmdclass=cmdclass, install_requires=[f"torch=={public_torch}", "ninja"])


main()
