"""benchmarks/bench_e2e.py's GPU cases (harness/models.py) without a GPU: the same code paths at
tiny shapes, on CPU in this process and on the faked CUDA device of tools/fake_cuda in a child
process; the batch choice, the budget, and the merge into the GPU check's result files."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from hf_testing import ROOT

BENCH = os.path.join(ROOT, "benchmarks")
if BENCH not in sys.path:
    sys.path.insert(0, BENCH)

import bench_e2e  # noqa: E402
from harness import models as hm  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def _rows(doc):
    return {(r["case"], r.get("impl")): r for r in doc["rows"]}


def _check_measured(rows, case, kind):
    ours, peft = rows[(case, "ours")], rows[(case, "peft")]
    for r in (ours, peft):
        assert r["kind"] == kind and r["tokens_per_s"] > 0 and len(r["seconds"]) >= 1
        assert r["tokens_per_s"] == pytest.approx(r["tokens_per_call"] / r["median_s"])
    assert ours["speed_vs_peft"] == pytest.approx(ours["tokens_per_s"] / peft["tokens_per_s"])
    return ours, peft


def test_tiny_cases_on_cpu(tmp_path):
    """Train with checkpointing and generation, both implementations, in bf16 on CPU: rows,
    ratios, files; an earlier results.md / results.json keep their content and gain a section."""
    merged = tmp_path / "mirror"
    merged.mkdir()
    (merged / "results.md").write_text("# kernel suite\n\nkernel rows\n")
    (merged / "results.json").write_text(json.dumps({"rows": [1, 2]}))
    argv = ["--tiny", "--reps", "2", "--cases", "train_gc", "generate_b1", "--out", str(tmp_path / "out"),
            "--merge-into", str(merged)]
    assert bench_e2e.main(argv) == 0
    doc = json.loads((tmp_path / "out" / "e2e.json").read_text())
    assert doc["meta"]["tiny"] and doc["meta"]["dtype"] == "bf16"
    rows = _rows(doc)
    ours, peft = _check_measured(rows, "train_gc", "train")
    assert ours["checkpointing"] and not peft["checkpointing"]
    assert ours["batch"] == peft["batch"] and 1 <= ours["batch"] <= 4 and "B = min(cap 4" in ours["batch_choice"]
    ours, _ = _check_measured(rows, "generate_b1", "generate")
    assert ours["batch"] == 1 and ours["tokens_per_call"] == 4
    assert ours["same_tokens_as_peft"] is not None and 0 <= ours["same_tokens_as_peft"] <= 1
    assert ours["peak_mb"] is None  # not measured on CPU
    # the merge: the kernel suite's content stays, the e2e section replaces an earlier one
    assert json.loads((merged / "results.json").read_text())["rows"] == [1, 2]
    assert json.loads((merged / "results.json").read_text())["e2e"]["rows"] == doc["rows"]
    bench_e2e.save(None, [str(merged)], doc["meta"], doc["rows"], doc["targets"])
    md = (merged / "results.md").read_text()
    assert md.startswith("# kernel suite\n\nkernel rows\n") and md.count(bench_e2e.E2E_SECTION) == 1
    assert "TINY SHAPES" in md and "| train_gc | ours + grad. ckpt |" in md


def test_fake_cuda_path_and_budget(tmp_path):
    """--device cuda on the faked device (tools/fake_cuda): synchronisation, the memory calls and
    the batch choice run; then a budget of 0 s skips every case and still writes the files."""
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "PREFIX_ATTN_MIRROR")}
    env.update(PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "tools", "fake_cuda"), ROOT]),
               PREFIX_ATTN_FAKE_CUDA="1", HF_HUB_OFFLINE="1", PREFIX_ATTN_COMMIT="c0ffee")
    script = os.path.join(BENCH, "bench_e2e.py")
    base = [sys.executable, script, "--device", "cuda", "--tiny", "--reps", "2"]
    run = subprocess.run(base + ["--cases", "train", "--out", str(tmp_path / "a")], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    doc = json.loads((tmp_path / "a" / "e2e.json").read_text())
    assert doc["meta"]["device_name"] == "Fake CUDA (CPU)" and doc["meta"]["commit"] == "c0ffee"
    ours, _ = _check_measured(_rows(doc), "train", "train")
    assert ours["peak_mb"] == 0  # the (faked) CUDA memory counters were read
    assert "memory not measured on cuda" in ours["batch_choice"]

    run = subprocess.run(base + ["--budget", "0", "--out", str(tmp_path / "b"), "--merge-into", str(tmp_path / "m")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    doc = json.loads((tmp_path / "b" / "e2e.json").read_text())
    assert not doc["meta"]["complete"]
    assert [r["case"] for r in doc["rows"]] == [c.name for c in hm.gpu_cases(tiny=True)]
    assert all(r["skipped"].startswith("not run: 0 s left") for r in doc["rows"])
    assert all(t["met"] is None for t in doc["targets"])
    assert sorted(os.listdir(tmp_path / "m")) == ["results.json", "results.md"]
    assert "INCOMPLETE" in (tmp_path / "m" / "results.md").read_text()


def test_run_case_without_a_budget():
    """The CPU cases run with no budget (an infinite end): every repeat is timed, ABBA."""
    base = hm.load_base("llama-1b", "cpu", torch.float32, tiny=True)
    case = hm.ModelCase("t", "llama-1b", "train", 2, 8, 2)
    ours, peft = hm.run_case(case, base, "cpu", reps=3)
    assert len(ours["seconds"]) == len(peft["seconds"]) == 3 and ours["timing"] == "median of 3 interleaved repeats"
    assert ours["tokens_per_call"] == 16 and ours["peak_mb"] is None  # memory: cpu_memory=0


@pytest.mark.parametrize("free_gb, m1_gb, m2_gb, t2, expected", [
    (100.0, 3.0, 5.0, 0.1, 42),   # memory decides: 2 GB per row + 1 GB, (0.85 x 100 - 1) / 2 = 42
    (100.0, 3.0, 5.0, 1.0, 6),    # time decides: 3 s per step at 0.5 s per row
    (1000.0, 1.0, 1.5, 0.001, 256),  # the cap decides
    (1.0, 3.0, 5.0, 0.1, 1),      # not even one row fits: one row, and the run will say so if it fails
])
def test_batch_that_fills(free_gb, m1_gb, m2_gb, t2, expected):
    GB = 10**9
    batch, how = hm.batch_that_fills(int(free_gb * GB), int(m1_gb * GB), int(m2_gb * GB), t2, cap=256,
                                     max_step_s=3.0)
    per_row, fixed = (m2_gb - m1_gb), m1_gb - (m2_gb - m1_gb)
    by_memory = max(1, int((0.85 * free_gb - fixed) // per_row))
    assert batch == min(256, by_memory, max(1, int(3.0 / (t2 / 2)))) == expected, how
    assert f"B = {batch}" in how
