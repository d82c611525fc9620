"""`make gpu-check` (tools/gpu_check.sh) and the commit it records, on a machine without a GPU.

The check itself needs a GPU; what can go wrong before one is reached is tested here: the one-line
refusal without CUDA (never a traceback), the choice of python, the commit in a copy of the tree
without .git, and, on a faked CUDA device (tools/fake_cuda), the control flow, deadline and files.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRIVER = os.path.join(ROOT, "tools", "gpu_check.sh")

pytestmark = pytest.mark.skipif(torch.cuda.is_available() or shutil.which("bash") is None,
                                reason="needs bash, and a machine without CUDA")


def _driver(env, *args, timeout=180):
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "PREFIX_ATTN_MIRROR", "GPU_PYTHON",
                                                            "PREFIX_ATTN_FAKE_CUDA")} | env
    return subprocess.run(["bash", DRIVER, *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("python", [sys.executable, "/usr/bin/false", "/nonexistent/python"],
                         ids=["cpu-torch", "false", "missing"])
def test_without_cuda_one_line_and_nonzero(python):
    r = _driver({"GPU_PYTHON": python})
    lines = (r.stdout + r.stderr).strip().splitlines()
    assert r.returncode == 2, r
    assert len(lines) == 1 and lines[0].startswith("gpu-check: no CUDA"), lines
    if python == sys.executable:
        assert lines[0] == f"gpu-check: no CUDA device: torch {torch.__version__} has no CUDA"


def test_takes_the_venv_when_python3_has_no_torch(tmp_path):
    bin_dir, venv = tmp_path / "bin", tmp_path / "venv"
    bin_dir.mkdir()
    (venv / "bin").mkdir(parents=True)
    (bin_dir / "python3").write_text("#!/bin/sh\nexit 1\n")  # a python3 without torch
    (bin_dir / "python3").chmod(0o755)
    (venv / "bin" / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (venv / "bin" / "python").chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "PREFIX_ATTN_VENV": str(venv)}
    r = _driver(env)
    assert r.returncode == 2 and r.stderr.strip() == f"gpu-check: no CUDA device: torch {torch.__version__} has no CUDA"
    r = _driver(dict(env, PREFIX_ATTN_VENV=str(tmp_path / "absent")))
    assert r.returncode == 2 and r.stderr.startswith("gpu-check: no CUDA-enabled torch:"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_commit_without_git(tmp_path):
    """A copy stamped by `make gpu-stamp` keeps its commit without .git, flags changes made after
    the stamp, and never takes a parent directory's repository for its own."""
    outer = tmp_path / "outer"
    proj = outer / "proj"
    (proj / "tools").mkdir(parents=True)
    shutil.copy(os.path.join(ROOT, "tools", "project_commit.py"), proj / "tools")
    (proj / "a.txt").write_text("a\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    for d in (outer, proj):
        subprocess.run(git + ["init", "-q", str(d)], check=True)
    subprocess.run(git + ["-C", str(proj), "add", "-A"], check=True)
    subprocess.run(git + ["-C", str(proj), "commit", "-qm", "x"], check=True)
    subprocess.run(git + ["-C", str(outer), "commit", "-q", "--allow-empty", "-m", "outer"], check=True)
    head = subprocess.check_output(["git", "-C", str(proj), "rev-parse", "--short=12", "HEAD"], text=True).strip()

    def commit(**env):
        e = {k: v for k, v in os.environ.items() if k != "PREFIX_ATTN_COMMIT"} | env
        return subprocess.check_output([sys.executable, str(proj / "tools" / "project_commit.py")], env=e,
                                       text=True).strip()

    assert subprocess.check_output([sys.executable, str(proj / "tools" / "project_commit.py"), "--stamp"],
                                   text=True).strip() == head
    shutil.rmtree(proj / ".git")  # the copy a GPU machine gets, still inside another repository
    assert commit() == head
    assert commit(PREFIX_ATTN_COMMIT="given") == "given"
    (proj / "a.txt").write_text("b\n")
    assert commit() == head + "+changed-since-stamp"
    (proj / ".commit").unlink()
    assert commit() == "unknown"


def test_fake_cuda_flow_files_and_deadline(tmp_path):
    """On a faked device with a 20 s budget: no build, no time for the tier (a failure), the suite
    stops at its deadline, the end-to-end benchmark skips its cases for lack of time; every file
    is written in both folders, flat, with the commit; the mirror stays within 7 files."""
    local, mirror = tmp_path / "local", tmp_path / "out"
    env = {"PYTHONPATH": os.path.join(ROOT, "tools", "fake_cuda"), "PREFIX_ATTN_FAKE_CUDA": "1",
           "GPU_PYTHON": sys.executable, "PREFIX_ATTN_COMMIT": "c0ffee"}
    r = _driver(env, "--skip-build", "--seconds", "20", "--out", str(local), "--mirror", str(mirror))
    log = r.stdout + r.stderr
    assert r.returncode == 1, log
    assert "no time left for the test tier" in log and "deadline reached after 0 of" in log, log
    assert "FAILED: tests" in log
    assert "== end to end" in log and "FAILED: tests" in log and "e2e" not in log.split("FAILED:")[-1], log
    for d in (local, mirror):
        names = sorted(os.listdir(d))
        local_only = ["e2e.json", "e2e.md", "e2e.png"] if d == local else []
        assert names == sorted(["env.txt", "gpu-check.log", "results.json", "results.md", "results.png",
                                *local_only]), names
        assert all((d / n).is_file() for n in names)
        for n in ("env.txt", "gpu-check.log", "results.md"):
            assert "c0ffee" in (d / n).read_text(), n
        results = json.loads((d / "results.json").read_text())
        assert results["meta"]["commit"] == "c0ffee" and results["e2e"]["meta"]["commit"] == "c0ffee"
        assert results["e2e"]["rows"] and all(r["skipped"].startswith("not run") for r in results["e2e"]["rows"])
        assert "## End to end" in (d / "results.md").read_text()


def _fake_env(tmp_path, **extra):
    return {"PYTHONPATH": os.path.join(ROOT, "tools", "fake_cuda"), "PREFIX_ATTN_FAKE_CUDA": "1",
            "GPU_PYTHON": sys.executable, "PREFIX_ATTN_COMMIT": "c0ffee", "GPU_CHECK_WORKERS": "0", **extra}


def _summary(out):
    assert "## gpu summary: " in out, out[-3000:]
    return out[out.index("## gpu summary: "):]


def test_fake_cuda_two_calls(tmp_path):
    """`make gpu-call-1` then `make gpu-call-2` on a faked device, into one results folder: call 1
    builds (fails: no nvcc), runs compute-sanitizer (a fake one that cannot attach: skipped in one
    line, not a failure) and the tier until its timeout, whose tests are still counted from the
    log; call 2 skips nothing it needs, runs the suite and e2e to the deadline; each mirror holds
    only its call's files; each call ends with a summary of both, under 10,000 characters."""
    local, m1, m2, bin_dir = tmp_path / "local", tmp_path / "out1", tmp_path / "out2", tmp_path / "bin"
    bin_dir.mkdir()
    san = bin_dir / "compute-sanitizer"
    san.write_text('#!/bin/sh\necho "========= Error: Device not supported"\nexit 255\n')
    san.chmod(0o755)
    env = _fake_env(tmp_path, PATH=f"{bin_dir}:{os.environ['PATH']}", GPU_CHECK_SANITIZER_MIN_LEFT="0")
    r = _driver(env, "--call", "1", "--seconds", "40", "--out", str(local), "--mirror", str(m1))
    log = r.stdout.split("## gpu summary: ")[0] + r.stderr
    assert r.returncode == 1, log
    assert "== compute-sanitizer: skipped (it cannot attach to this device)" in log
    assert "FAILED: build tests" in log and "sanitizer" not in log.split("FAILED:")[-1].splitlines()[0]
    assert "== benchmarks" not in log and "== end to end" not in log
    assert sorted(os.listdir(m1)) == ["build.log", "call-1.log", "env.txt", "tests.log", "tier.xml"]
    s1 = _summary(r.stdout)
    assert len(s1) < 10000 and r.stdout.rstrip().endswith(s1.rstrip())
    assert "### call-1.log" in s1 and "cuda-sanitize: skipped: compute-sanitizer cannot attach" in s1
    tier_line = next(ln for ln in s1.splitlines() if ln.startswith("test tier: "))
    assert "timed out" in tier_line and int(tier_line.split()[2]) > 0, s1  # tests passed before the timeout
    assert "float64 oracle: " in s1 and "kernel suite: no results.json" in s1

    r = _driver(_fake_env(tmp_path), "--call", "2", "--seconds", "25", "--out", str(local), "--mirror", str(m2))
    log = r.stdout.split("## gpu summary: ")[0] + r.stderr  # the summary quotes call 1's log too
    assert "== test tier" not in log and "== benchmarks" in log and "== end to end" in log, log
    assert sorted(os.listdir(m2)) == ["build.log", "call-2.log", "env.txt", "results.json", "results.md",
                                      "results.png"]
    results = json.loads((m2 / "results.json").read_text())
    assert results["meta"]["tests_rc"] == 124  # call 1's tier status, read from tests.log
    assert [r["case"] for r in results["e2e"]["rows"]][:3] == ["long_n8192", "prefix_p512", "bank"]
    s2 = _summary(r.stdout)
    assert len(s2) < 10000 and "### call-1.log" in s2 and "### call-2.log" in s2 and tier_line in s2
    assert "target long_n8192 tokens_per_s >= 1.2" in s2 and "kernel suite: 0 rows, INCOMPLETE" in s2


def test_sanitizer_probe_skips_in_one_line(tmp_path):
    san = tmp_path / "compute-sanitizer"
    san.write_text('#!/bin/sh\necho "========= Error: Target application terminated before first instrumented API call"\n'
                   'exit 1\n')
    san.chmod(0o755)
    r = subprocess.run(["bash", os.path.join(ROOT, "tools", "cuda_sanitize.sh"), sys.executable],
                       env=dict(os.environ, COMPUTE_SANITIZER=str(san)), capture_output=True, text=True, timeout=60)
    assert r.returncode == 3 and r.stderr == ""
    assert r.stdout.splitlines() == ["cuda-sanitize: skipped: compute-sanitizer cannot attach to this device (probe "
                                     "exit 1: Error: Target application terminated before first instrumented API call)"]


def test_triton_cache_hook_logs_hits_and_misses(tmp_path):
    """The hook chains to the next sitecustomize (the faked device still works) and, outside the
    interpreter, installs Triton's compilation listener, which writes one line per request."""
    hook = os.path.join(ROOT, "tools", "triton_cache_hook")
    log = tmp_path / "triton.log"
    code = ("import torch; print(torch.cuda.is_available())")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env=dict(env, PYTHONPATH=f"{hook}:{os.path.join(ROOT, 'tools', 'fake_cuda')}",
                                PREFIX_ATTN_FAKE_CUDA="1", PREFIX_ATTN_TRITON_LOG=str(log)))
    assert r.stdout.strip() == "True", r.stderr
    pytest.importorskip("triton")
    code = ("from types import SimpleNamespace as NS; from triton import knobs; l = knobs.compilation.listener; "
            "l(src=NS(name='_fwd'), metadata={'hash': 'ab' * 20}, metadata_group={}, times=None, cache_hit=True); "
            "l(src=NS(name='_bwd'), metadata={'hash': 'cd' * 20}, metadata_group={}, times=None, cache_hit=False)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env=dict(env, PYTHONPATH=hook, PREFIX_ATTN_TRITON_LOG=str(log)))
    assert r.returncode == 0, r.stderr
    assert log.read_text().splitlines() == ["hit _fwd " + "ab" * 8, "miss _bwd " + "cd" * 8]
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import gpu_summary

    assert gpu_summary.triton_cache(str(tmp_path)) == ["Triton cache: no compile requests logged (no Triton kernel "
                                                       "compiled, or no listener)"]
    log.rename(tmp_path / "triton-cache-call-1.log")
    assert gpu_summary.triton_cache(str(tmp_path)) == ["Triton cache, triton-cache-call-1.log: 1 hits, 1 misses",
                                                       "  misses by kernel: _bwd 1"]


def test_triton_cache_relocate(tmp_path):
    """Triton's group files name their entries by absolute path: a cache unpacked elsewhere must be
    pointed at its own files (or every entry misses), and entries whose files are gone are dropped."""
    entry = tmp_path / "cache" / "ABC"
    entry.mkdir(parents=True)
    for name in ("_fwd_kernel.cubin", "_fwd_kernel.json", "_fwd_kernel.ptx"):
        (entry / name).write_text("x")
    old = {n: f"/elsewhere/cache/ABC/{n}" for n in ("_fwd_kernel.cubin", "_fwd_kernel.json", "_fwd_kernel.ptx",
                                                    "_fwd_kernel.source")}
    (entry / "__grp___fwd_kernel.json").write_text(json.dumps({"child_paths": old}))
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import triton_cache_prepare

    assert triton_cache_prepare.relocate(str(tmp_path / "cache"), prune=True) == 1
    fixed = json.loads((entry / "__grp___fwd_kernel.json").read_text())["child_paths"]
    assert fixed == {n: str(entry / n) for n in ("_fwd_kernel.cubin", "_fwd_kernel.json")}
    assert not (entry / "_fwd_kernel.ptx").exists()
