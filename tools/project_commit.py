"""The project commit that result files record, also in a copy of the tree without .git.

    python tools/project_commit.py            # prints it, e.g. e716880 or e716880-dirty
    python tools/project_commit.py --stamp    # also writes it to .commit, which travels with the tree

In order of preference:
1. $PREFIX_ATTN_COMMIT, when set (a caller that knows better);
2. git, only when this project's own .git is here: git never looks in a parent directory, whose
   repository would be some other project's;
3. the stamp .commit (`make gpu-stamp`), for a copy without .git such as a lent GPU machine's. The
   stamp holds a hash of the tracked files' contents: when they changed after stamping, the
   commit gets the suffix "+changed-since-stamp" rather than being passed off as exact;
4. "unknown".

Standard library only: it runs under any python3, before torch is known to import.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAMP = os.path.join(ROOT, ".commit")
ENV_VAR = "PREFIX_ATTN_COMMIT"
# Results are written into the tree while a check runs; they do not make the code dirty.
_NOT_CODE = ":(exclude)benchmarks/results"


def _git(*args: str) -> str:
    return subprocess.check_output(["git", "-C", ROOT, *args], text=True, stderr=subprocess.DEVNULL).strip()


def _files_hash(paths) -> str:
    h = hashlib.sha256()
    for rel in paths:
        h.update(rel.encode() + b"\0")
        try:
            with open(os.path.join(ROOT, rel), "rb") as f:
                h.update(hashlib.sha256(f.read()).digest())
        except OSError:
            h.update(b"missing")
    return h.hexdigest()


def from_git() -> str | None:
    if not os.path.exists(os.path.join(ROOT, ".git")):
        return None
    try:
        commit = _git("rev-parse", "--short=12", "HEAD")
        dirty = _git("status", "--porcelain", "--untracked-files=no", "--", ".", _NOT_CODE)
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("-dirty" if dirty else "")


def from_stamp() -> str | None:
    try:
        with open(STAMP) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    if not lines or not lines[0].strip():
        return None
    commit = lines[0].strip()
    if len(lines) >= 3 and lines[2] != _files_hash(lines[3:]):
        commit += "+changed-since-stamp"
    return commit


def project_commit() -> str:
    return os.environ.get(ENV_VAR) or from_git() or from_stamp() or "unknown"


def stamp() -> str:
    """Writes .commit from git: the commit, then the hash and list of the tracked files."""
    commit = from_git()
    if commit is None:
        raise SystemExit(f"project_commit: no git repository at {ROOT}; nothing to stamp")
    paths = [p for p in _git("ls-files").splitlines() if p != ".commit" and not p.startswith("benchmarks/results/")]
    with open(STAMP, "w") as f:
        f.write(f"{commit}\n# tools/project_commit.py --stamp: sha256 of the files listed below\n")
        f.write(_files_hash(paths) + "\n" + "\n".join(paths) + "\n")
    return commit


if __name__ == "__main__":
    print(stamp() if sys.argv[1:] == ["--stamp"] else project_commit())
