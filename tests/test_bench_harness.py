"""The benchmark harness (benchmarks/harness/): the interleaved timer, the memory measurers, the
provenance rule, the report writer, and the measurement of one kernel (shape, pass). Fast, CPU only."""
import dataclasses
import json
import os
import re
import statistics
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
if BENCH not in sys.path:
    sys.path.insert(0, BENCH)

from harness import attention as at, memory, provenance, report, timer  # noqa: E402


# ------------------------------------------------------------------------------------- timer


def _recorder(log, name, seconds=0.0):
    def fn():
        log.append(name)
        time.sleep(seconds)
    return fn


@pytest.mark.parametrize("abba", [False, True], ids=["abab", "abba"])
def test_timer_interleaves(abba):
    log = []
    fns = {n: _recorder(log, n) for n in "abc"}
    times = timer.time_interleaved(fns, warmup=1, reps=4, abba=abba)
    assert {n: len(t) for n, t in times.items()} == {"a": 4, "b": 4, "c": 4}
    timed = log[3:]  # after one warm-up round
    rounds = [timed[i:i + 3] for i in range(0, 12, 3)]
    expected = [list("abc"), list("cba") if abba else list("abc")] * 2
    assert rounds == expected


def test_timer_leaves_prepare_out_and_fits_the_budget():
    log = []
    slow_setup = _recorder(log, "b", 0.001)
    slow_setup.prepare = lambda: time.sleep(0.05)  # untimed
    times = timer.time_interleaved({"a": _recorder(log, "a", 0.01), "b": slow_setup}, warmup=1, budget_s=0.15,
                                   min_reps=2, max_reps=50)
    assert statistics.median(times["b"]) < 40 and min(times["a"]) >= 10
    assert 2 <= len(times["a"]) <= 20  # ~0.15 s / ~0.011 s a round (prepare is not in the budget's round)
    assert len(timer.time_interleaved({"a": _recorder(log, "a")}, reps=50, deadline=time.time() - 1)["a"]) == 1


def test_summary():
    s = timer.summary([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (s["ms"], s["ms_min"], s["reps"]) == (3.0, 1.0, 5)
    assert s["ms_iqr"] == pytest.approx(3.0)  # quartiles 1.5 and 4.5 (exclusive method)


# ------------------------------------------------------------------------------------- memory


def test_cpu_peak_in_a_fresh_process():
    mb = memory.measure_peak_extra("harness.memory:selftest_alloc", {"mbytes": 10.0}) / 1e6
    assert 9.5 <= mb <= 11.0
    assert memory.measure_peak_extra("harness.memory:selftest_noop") / 1e6 < 1.0
    with pytest.raises(memory.MemoryMeasurementError, match="no_such_factory"):
        memory.measure_peak_extra("harness.memory:no_such_factory")


def test_cuda_peak_is_above_what_was_allocated_before(monkeypatch):
    counters = {"now": 100, "peak": 100}

    def allocate():
        counters["peak"] = counters["now"] + 250
        return "out"
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: counters.update(peak=counters["now"]))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: counters["now"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: counters["peak"])
    result, seconds, peak = memory.peak_call(allocate, "cuda")
    assert (result, peak) == ("out", 250) and seconds >= 0
    assert memory.peak_call(lambda: 1, "cpu")[2] is None  # off CUDA only a fresh process measures


# ------------------------------------------------------------------------------------- provenance


@pytest.mark.parametrize("flags, level", [("fpu sse avx avx2 fma", "avx2"), ("avx2 avx512f avx512bw", "avx512"),
                                          ("avx2 avx512f amx_bf16 amx_tile", "amx")])
def test_isa_level(flags, level):
    assert provenance.isa_level(flags) == level


def test_hardware_names():
    # the same model name, two ISA levels: two folders
    assert provenance.hardware_slug("cpu", "AMD EPYC", "avx2") == "cpu-amd-epyc-avx2"
    assert provenance.hardware_slug("cpu", "AMD EPYC", "avx512") == "cpu-amd-epyc-avx512"
    assert provenance.hardware_slug("cpu", "Intel(R) Xeon(R) Processor @ 2.1GHz", "amx") == "cpu-intel-xeon-amx"
    assert provenance.hardware_slug("cuda", "NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    # tools/gpu_check.sh names the GPU's folder before any python of ours runs: the same rule
    rule = 're.sub(r"[^a-z0-9]+", "-", '
    with open(os.path.join(ROOT, "tools", "gpu_check.sh")) as f:
        assert rule + 'name.lower()).strip("-")' in f.read()
    with open(provenance.__file__) as f:
        assert rule + '(model or torch.cuda.get_device_name()).lower()).strip("-")' in f.read()


def test_commit_is_project_commits(monkeypatch):
    monkeypatch.delenv("PREFIX_ATTN_COMMIT", raising=False)
    tool = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "project_commit.py")], capture_output=True,
                          text=True, env={k: v for k, v in os.environ.items() if k != "PREFIX_ATTN_COMMIT"})
    assert provenance.commit() == tool.stdout.strip() != ""
    monkeypatch.setenv("PREFIX_ATTN_COMMIT", "given")
    assert provenance.commit() == "given" and provenance.environment("cpu")["commit"] == "given"


# ------------------------------------------------------------------------------------- report


def test_report_writes_table_json_and_png(tmp_path):
    rows = [{"a": 1, "b": 2.5}, {"a": 3, "b": None}]
    table = report.markdown_table(rows, [("A", lambda r: r["a"]), ("B", lambda r: report.cell(r["b"], ".1f"))])
    assert table.splitlines() == ["| A | B |", "| --- | --- |", "| 1 | 2.5 |", "| 3 | - |"]
    plotted = []
    paths = report.write([str(tmp_path / "x"), str(tmp_path / "y")], "r", {"rows": rows}, table,
                         lambda path: plotted.append(path) or False)
    assert sorted(os.path.relpath(p, tmp_path) for p in paths) == ["x/r.json", "x/r.md", "y/r.json", "y/r.md"]
    assert json.loads((tmp_path / "y" / "r.json").read_text()) == {"rows": rows}
    assert (tmp_path / "x" / "r.md").read_text() == table + "\n" and len(plotted) == 2
    pytest.importorskip("matplotlib")
    assert report.bar_plot(str(tmp_path / "p.png"), "t", [("y", {"s": {"g1": 1.0, "g2": 2.0}})], log=True, parity=True)
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_merge_section_keeps_the_rest_and_replaces_its_own(tmp_path):
    (tmp_path / "results.md").write_text("# suite\n\nrows\n")
    (tmp_path / "results.json").write_text(json.dumps({"rows": [1]}))
    for n in (1, 2):
        report.merge_section(str(tmp_path), "results", "e2e", {"n": n}, "## E2E", f"table {n}")
    assert json.loads((tmp_path / "results.json").read_text()) == {"rows": [1], "e2e": {"n": 2}}
    assert (tmp_path / "results.md").read_text() == "# suite\n\nrows\n\n## E2E\n\ntable 2\n"


# ------------------------------------------------------------------------------------- one kernel measurement


def test_prefix_only_step_times_the_backward_alone():
    shape = at.Shape(B=1, H=2, N=8, P=4, D=8, causal=True)
    calls = []
    inner = at.ours(shape, "reference")

    def fn(*x):
        calls.append(x[0].data_ptr())
        return inner(*x)
    sets = at.make_inputs(shape, "prefix_only_bwd", "cpu", torch.float32, n_sets=2)
    step = at.make_step(fn, sets, "prefix_only_bwd")
    step.prepare()
    step()
    assert len(calls) == 1  # the forward ran in prepare, untimed
    step()  # without prepare (a memory measurement): forward and backward
    assert calls == [sets[0][0].data_ptr(), sets[1][0].data_ptr()]  # rotating among the sets
    assert all(t.grad is None for x in sets for t in x[:5])
    assert not at.make_inputs(shape, "prefix_only_bwd", "cpu", torch.float32)[0][0].requires_grad


def test_measure_flags_a_wrong_implementation(monkeypatch):
    shape = at.Shape(B=1, H=2, Hkv=1, N=12, P=3, D=8, causal=True)

    def off_by_one_percent(shape, device):
        right = at.sdpa_cat(shape, device)
        return lambda *x: right(*x) * 1.01
    monkeypatch.setitem(at.INCUMBENTS, "wrong", dataclasses.replace(at.INCUMBENTS["sdpa-cat"], build=off_by_one_percent))
    for reference, bad in (("sdpa-cat", False), ("wrong", True)):
        rows = at.measure(shape, "train_step", ["ours-reference", reference], reps=2, memory=False)
        ours = rows[0]
        assert ours["reference_impl"] == reference and ours["ms"] > 0 and ours["tflops"] > 0
        assert set(ours["diff_by_tensor"]) == {"out", "dq", "dk", "dv", "dprefix_k", "dprefix_v"}
        assert (ours["max_rel_diff"] > 1e-3) is bad, ours["max_rel_diff"]


def test_measure_keeps_a_failing_implementation_to_its_row(monkeypatch):
    def broken(shape, device):
        raise NotImplementedError("no such head dim")
    monkeypatch.setitem(at.INCUMBENTS, "broken", dataclasses.replace(at.INCUMBENTS["sdpa-cat"], build=broken))
    rows = at.measure(at.Shape(B=1, H=2, N=8, P=2, D=8, causal=False), "fwd", ["broken", "sdpa-cat"], reps=2,
                      memory=False)
    assert rows[0]["error"] == "NotImplementedError: no such head dim" and "ms" not in rows[0]
    assert rows[1]["ms"] > 0 and rows[1]["reference_impl"] == "sdpa-cat"


def test_bench_attention_side_by_side():
    import bench_attention as ba

    shape = at.Shape(B=1, H=2, N=8, P=2, D=8, causal=True)
    base = dict(config=shape.name, dtype="fp32", B=1, H=2, Hkv=2, N=8, Nk=8, P=2, D=8, causal=True, dropout=0.0,
                mode="fwd", reps=3, background_cpu=0.0, cpu_per_wall=1.0, ms_iqr=0.0)
    ours = dict(base, impl="ours", ms=2.0, ms_min=1.0, peak_mb=0.05, max_abs_diff=1e-7)
    inc = dict(base, impl="sdpa-cat", ms=5.0, ms_min=4.0, peak_mb=3.0)
    row = ba.side_by_side([ours, inc], "sdpa-cat", "cpu")
    assert (row["speedup"], row["speedup_min"]) == (2.5, 4.0)
    assert row["mem_ratio"] == pytest.approx(30.0) and row["mem_ratio_is_lower_bound"]  # against the 0.1 MB floor
    assert row["ours_gflops"] == pytest.approx(at.flops(shape, "fwd") / 2.0 / 1e6)
    with pytest.raises(RuntimeError, match="sdpa-cat: boom"):
        ba.side_by_side([ours, dict(inc, error="boom")], "sdpa-cat", "cpu")
    assert re.fullmatch(r"\| B1-H2-N8-P2-D8-causal \| fwd \| 2\.00 \| 5\.00 \| 2\.50x .*", ba.tables([row], {}).splitlines()[2])


def test_measure_times_the_others_when_one_fails_while_timed(monkeypatch):
    def fails_later(shape, device):
        right, calls = at.sdpa_cat(shape, device), []

        def fn(*x):
            calls.append(1)
            if len(calls) > 2:  # the first call and the warm-up pass; then out of memory
                raise torch.OutOfMemoryError("CUDA out of memory")
            return right(*x)
        return fn
    monkeypatch.setitem(at.INCUMBENTS, "flaky", dataclasses.replace(at.INCUMBENTS["sdpa-cat"], build=fails_later))
    rows = at.measure(at.Shape(B=1, H=2, N=8, P=2, D=8, causal=True), "prefix_only_bwd", ["ours", "flaky", "sdpa-cat"],
                      warmup=1, reps=3, memory=False)
    assert [("ms" in r, r.get("error", "")[:29]) for r in rows] == [
        (True, ""), (False, "OutOfMemoryError while timed:"), (True, "")]
    assert len({r["reps"] for r in rows if "ms" in r}) == 1
