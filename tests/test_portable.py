"""One portable binary, and never a silent fallback.

- The CPU kernels are compiled once per ISA level (AVX-512, AVX2, baseline x86-64) and the
  dispatcher picks the best level the CPU runs; every level passes the CPU oracle tests (forced
  with PREFIX_ATTN_CPU_ISA, natively), and the binary holds no instruction above each level
  (tools/isa_check.py, over objdump).
- Under emulated CPUs (qemu-user: Haswell = AVX2, Nehalem = no AVX), the package imports, the
  dispatcher picks that CPU's level, and the kernels match the oracle (tools/emulated_check.py).
  They run where qemu-x86_64 is on PATH (CI installs it); `make qemu-check` runs more under it.
- Where the extension is missing or broken, the cpu backend's reason and the fallback warning
  carry the real error, in one line, once.
- `python -m prefix_attn` reports what a bug report needs.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

import prefix_attn
from prefix_attn import _build, _ops, backends

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

needs_extension = pytest.mark.skipif(not _ops.HAS_EXTENSION, reason="compiled ops not built")
LEVELS = ["avx512", "avx2", "baseline"]


def built_levels():
    return list(_ops._C._cpu_isas_built())


portable_x86 = pytest.mark.skipif(
    not (_ops.HAS_EXTENSION and _build.is_x86_64() and built_levels() == LEVELS),
    reason="not a portable x86-64 build (PREFIX_ATTN_CPU_ARCH=native, or another architecture)")


def cpu_flags() -> set:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


def cpu_runs(level: str) -> bool:
    flags = cpu_flags()
    v3 = {"avx", "avx2", "fma", "f16c", "bmi1", "bmi2", "movbe", "abm"} <= flags
    v4 = v3 and {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"} <= flags
    return {"avx512": v4, "avx2": v3, "baseline": True}[level]


def run_python(args, env_extra=None, timeout=600, prefix=()):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("PREFIX_ATTN_CPU_ISA", None)
    env.update(env_extra or {})
    return subprocess.run([*prefix, sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


# --------------------------------------------------------------------------- the levels


@portable_x86
@pytest.mark.skipif(bool(os.environ.get("PREFIX_ATTN_CPU_ISA")), reason="PREFIX_ATTN_CPU_ISA forces a level")
def test_dispatch_picks_the_best_level_this_cpu_runs():
    want = next(level for level in LEVELS if cpu_runs(level))
    assert _ops._C._cpu_isa() == want


@portable_x86
@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump (binutils) not installed")
def test_each_level_uses_only_its_instructions():
    """zmm in the AVX-512 level, ymm and no zmm in the AVX2 level, no AVX at all in the baseline and
    in everything outside the levels (op glue, dispatcher, library code the linker kept)."""
    import isa_check

    path = _ops._C.__file__
    assert isa_check.check(path) == []


@portable_x86
@pytest.mark.parametrize("level", ["avx2", "baseline"])  # the best level runs every other test
def test_cpu_oracle_tests_at_a_forced_level(level):
    """The CPU oracle tests of the short tier (every kernel path), and the float32 / bfloat16
    checks of tools/emulated_check.py, at a level below the best one, natively."""
    if not cpu_runs(level):
        pytest.skip(f"this CPU does not run {level}")
    env = {"PREFIX_ATTN_CPU_ISA": level}
    check = run_python(["tools/emulated_check.py", "--expect", level], env)
    assert check.returncode == 0, check.stdout + check.stderr
    tests = run_python(["-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "tests/test_correctness.py",
                        "-m", "gpu_tier", "-k", "cpu"], env)
    assert tests.returncode == 0, tests.stdout[-4000:] + tests.stderr[-2000:]
    assert re.search(r"\d+ passed", tests.stdout), tests.stdout[-2000:]


@portable_x86
@pytest.mark.parametrize("value, says", [("bogus", "is not a level compiled into this build; it has: avx512, avx2, "
                                                   "baseline"),
                                         ("avx512", "this CPU cannot run that level")])
def test_a_forced_level_the_build_or_cpu_lacks_is_refused(value, says):
    if value == "avx512" and cpu_runs("avx512"):
        pytest.skip("this CPU runs AVX-512")
    code = ("import torch, prefix_attn\n"
            "try:\n    prefix_attn.prefix_attention(*[torch.zeros(1, 1, 4, 8)] * 3, backend='cpu')\n"
            "except RuntimeError as e:\n    print(str(e).splitlines()[0])\n")
    result = run_python(["-c", code], {"PREFIX_ATTN_CPU_ISA": value})
    assert f"PREFIX_ATTN_CPU_ISA={value}" in result.stdout and says in result.stdout, result.stdout + result.stderr


QEMU = shutil.which("qemu-x86_64")


@portable_x86
@pytest.mark.skipif(QEMU is None, reason="qemu-x86_64 not installed (Debian: apt-get install qemu-user)")
@pytest.mark.parametrize("cpu, level", [("Haswell", "avx2"), ("Nehalem", "baseline")])
def test_under_an_emulated_cpu(cpu, level):
    """About 80 s each on 2 cores. An AVX-512 instruction on the way (a -march=native build)
    ends the process with SIGILL (exit status 132)."""
    result = run_python(["tools/emulated_check.py", "--expect", level], prefix=(QEMU, "-cpu", cpu), timeout=900)
    assert result.returncode == 0, f"exit status {result.returncode}\n{result.stdout}\n{result.stderr[-3000:]}"


# --------------------------------------------------------------------------- missing or broken


@pytest.fixture
def fresh_registry(monkeypatch):
    monkeypatch.setattr(backends, "_availability", {})
    monkeypatch.setattr(backends, "_unavailable", {})
    monkeypatch.setattr(backends, "_warned_reference", False)


@pytest.fixture
def not_installed(fresh_registry, monkeypatch):
    """The state of a pure-Python install before its first call."""
    for name, value in [("_C", None), ("HAS_EXTENSION", False), ("EXTENSION_ERROR", None), ("BUILD", None),
                        ("_NOT_INSTALLED", True), ("_first_use_tried", False)]:
        monkeypatch.setattr(_ops, name, value)


def fallback_warnings(calls: int = 2):
    q = torch.zeros(1, 2, 3, 16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(calls):
            prefix_attn.prefix_attention(q, q, q)
    return [str(w.message) for w in caught if "falling back" in str(w.message)]


def test_no_compiler_says_why_once_in_one_line(not_installed, monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    messages = fallback_warnings()
    assert len(messages) == 1 and "\n" not in messages[0], messages
    assert "cpu (the compiled extension prefix_attn._C is not installed, and it is compiled at first use, and there " \
           "is no C++ compiler ('/nonexistent/c++'" in messages[0]
    assert "apt install g++" in messages[0]
    assert "no C++ compiler" in backends.unavailable_reason("cpu")
    assert _ops._first_use_tried and not _ops.HAS_EXTENSION


def test_sources_missing(not_installed, monkeypatch):
    monkeypatch.setattr(_ops, "_source_dir", lambda: None)
    assert "C++ sources are not in this install" in backends.unavailable_reason("cpu")


def test_a_failed_compile_is_one_line_with_the_log(not_installed, monkeypatch, tmp_path):
    from torch.utils import cpp_extension

    log = "Error building extension 'prefix_attn_C':\n[1/3] c++ -c api.cpp\nFAILED: x.o\nx.cpp:3:1: error: bad thing\n"

    def failing_load(**kwargs):
        raise RuntimeError(log)

    monkeypatch.setattr(cpp_extension, "load", failing_load)
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: True)
    monkeypatch.setenv("PREFIX_ATTN_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", sys.executable)  # any program that exists: the load above never runs it
    reason = backends.unavailable_reason("cpu")
    assert "\n" not in reason and "compiling it at first use failed: x.cpp:3:1: error: bad thing" in reason
    path = re.search(r"the whole log: (\S+)\)", reason).group(1)
    assert log.strip() in open(path).read()


def test_a_broken_install_carries_the_real_error_and_is_not_rebuilt(fresh_registry, monkeypatch):
    error = ImportError("/x/prefix_attn/_C.so: undefined symbol: _ZN3c104cuda9SetDeviceEa")
    for name, value in [("HAS_EXTENSION", False), ("EXTENSION_ERROR", error), ("_NOT_INSTALLED", False),
                        ("_first_use_tried", False)]:
        monkeypatch.setattr(_ops, name, value)
    monkeypatch.setattr(_ops, "_build_first_use", lambda: pytest.fail("a broken install must not be built over"))
    reason = backends.unavailable_reason("cpu")
    assert reason.startswith("the installed extension prefix_attn._C did not load: /x/prefix_attn/_C.so: "
                             "undefined symbol: _ZN3c104cuda9SetDeviceEa")
    messages = fallback_warnings()
    assert len(messages) == 1 and "undefined symbol: _ZN3c104cuda9SetDeviceEa" in messages[0]


def test_triton_reason_is_specific(fresh_registry):
    reason = backends.unavailable_reason("triton")
    if reason is not None:
        assert "availability check" not in reason
        assert "triton is not installed" in reason or "torch.cuda.is_available() is False" in reason


# --------------------------------------------------------------------------- python -m prefix_attn


@needs_extension
def test_python_m_prefix_attn():
    result = run_python(["-m", "prefix_attn"], timeout=300)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"prefix_attn  {prefix_attn.__version__}" in out
    assert f"torch        {torch.__version__}" in out and "triton       " in out
    assert re.search(r"CPU kernels at ISA level (avx512|avx2|baseline|native) \(built: ", out), out
    assert re.search(r"^  cpu +available$", out, re.M) and re.search(r"^  reference +available$", out, re.M), out
    assert re.search(r"^  cuda +not available: .+", out, re.M) or torch.cuda.is_available(), out
    assert re.search(r"^gpu ", out, re.M), out
