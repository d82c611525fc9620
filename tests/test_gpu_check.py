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
