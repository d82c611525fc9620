"""A short summary of what `make gpu-call-1` and `make gpu-call-2` left in a results folder, sized
for the last 12,000 characters of a device command's output (--max-chars, default 10,000).

    python tools/gpu_summary.py benchmarks/results/<gpu> [--max-chars N]

Sections, each from the files present (a call whose files are missing says so in one line):
the steps and their seconds (call-1.log, call-2.log, gpu-check.log), compute-sanitizer's verdict
(tests.log), the test tier by file and group (tests.log's pytest -v lines, tier.xml's messages:
the float64-oracle tests, the sync-free checks, the CUDA-graph capture), the Triton compile cache's hits and misses (triton-cache-call-N.log),
the suite's target rows (results.json), and the end-to-end targets and cases (its "e2e" key).
Standard library only: it runs with whatever python the GPU machine has.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
import xml.etree.ElementTree as ET

# Which tier tests belong to which check of call 1 (by test file, then by name).
GROUPS = [
    ("float64 oracle", lambda f, n: f.endswith(("test_correctness.py", "test_dropout.py", "test_ops.py"))),
    ("sync-free", lambda f, n: "sync" in f and "graph" not in n),
    ("CUDA graph", lambda f, n: "graph" in n),
]


def read(path: str) -> str | None:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return None


def steps(folder: str) -> list[str]:
    out = []
    for name in ("call-1.log", "call-2.log", "gpu-check.log"):
        text = read(os.path.join(folder, name))
        if text is None:
            continue
        keep = [ln for ln in text.splitlines()
                if ln.startswith("== ") or ln.startswith("gpu-check:") or "FAILED" in ln[:40]]
        out += [f"### {name}", *keep[-25:], ""]
    return out or ["(no call log: neither call has run into this folder)", ""]


def sanitizer(folder: str) -> list[str]:
    text = read(os.path.join(folder, "tests.log")) or ""
    lines = [ln for ln in text.splitlines() if ln.startswith(("cuda-sanitize:", "== memcheck exit", "== racecheck exit",
                                                               "# cuda-sanitize exit"))]
    return ["compute-sanitizer: " + ("; ".join(lines) if lines else "not run (no compute-sanitizer, or no time)")]


OUTCOME = re.compile(r"\b(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
NODE = re.compile(r"(tests/\S+?\.py)::(\S+)")


def tier(folder: str) -> list[str]:
    """From tests.log's one line per test (pytest -v, as it goes: a tier cut short still counts),
    the failure messages from tier.xml when pytest got to write it."""
    text = read(os.path.join(folder, "tests.log")) or ""
    results = {}
    for ln in text.splitlines():
        o, n = OUTCOME.search(ln), NODE.search(ln)
        if o and n and not ln.startswith(("FAILED ", "ERROR ")):  # not the short summary at the end
            results[(n.group(1), n.group(2))] = {"PASSED": "passed", "XFAIL": "passed", "XPASS": "passed",
                                                 "SKIPPED": "skipped"}.get(o.group(1), "failed")
    status = re.findall(r"pytest exit status: .*", text)
    if not results:
        return [f"test tier: no test finished ({status[-1] if status else 'the tier did not run in this folder'})"]
    by_file = collections.defaultdict(collections.Counter)
    groups = collections.defaultdict(collections.Counter)
    for (f, n), outcome in results.items():
        by_file[f][outcome] += 1
        for g, match in GROUPS:
            if match(f, n):
                groups[g][outcome] += 1
    messages = {}
    try:
        for case in ET.parse(os.path.join(folder, "tier.xml")).getroot().iter("testcase"):
            bad = case.find("failure") if case.find("failure") is not None else case.find("error")
            if bad is not None:
                msg = (bad.get("message") or bad.text or "").strip().splitlines()
                messages[case.get("name", "")] = msg[0][:160] if msg else ""
    except (OSError, ET.ParseError):
        pass
    failures = [f"- {f.split('/')[-1]}::{n}: {messages.get(n, '(see tests.log)')}"
                for (f, n), o in results.items() if o == "failed"]

    def fmt(c):
        return f"{c['passed']} passed, {c['failed']} failed, {c['skipped']} skipped"

    total = sum(by_file.values(), collections.Counter())
    out = [f"test tier: {fmt(total)}; {status[-1] if status else 'no exit status (killed?)'}"]
    out += [f"  {g}: {fmt(groups[g]) if groups[g] else 'NONE FINISHED'}" for g, _ in GROUPS]
    out += [f"  {f.split('/')[-1]}: {fmt(c)}" for f, c in sorted(by_file.items())]
    if failures:
        out += [f"failures ({len(failures)}, first 15):", *failures[:15]]
    return out


def triton_cache(folder: str) -> list[str]:
    names = sorted(n for n in os.listdir(folder) if re.fullmatch(r"triton-cache(-call-\d)?\.log", n)) \
        if os.path.isdir(folder) else []
    if not names:
        return ["Triton cache: no compile requests logged (no Triton kernel compiled, or no listener)"]
    out = []
    for name in names:
        hits, misses = collections.Counter(), collections.Counter()
        for ln in (read(os.path.join(folder, name)) or "").splitlines():
            kind, _, rest = ln.partition(" ")
            (hits if kind == "hit" else misses)[rest.split(" ")[0]] += 1
        out.append(f"Triton cache, {name}: {sum(hits.values())} hits, {sum(misses.values())} misses")
        if misses:
            out.append("  misses by kernel: " + ", ".join(f"{k} {v}" for k, v in misses.most_common(8)))
    return out


def suite(folder: str) -> list[str]:
    text = read(os.path.join(folder, "results.json"))
    if text is None:
        return ["kernel suite: no results.json (call 2 has not run into this folder)"]
    doc = json.loads(text)
    rows, meta = doc.get("rows", []), doc.get("meta", {})
    out = [f"kernel suite: {len(rows)} rows, {'complete' if meta.get('complete') else 'INCOMPLETE'}, "
           f"commit {meta.get('commit')}, tuned configs: {len(meta.get('tuned_configs') or [])}",
           "| case | dtype | N | P | D | causal | pass | impl | ms | TFLOP/s | vs best incumbent |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    ours = [r for r in rows if str(r.get("impl", "")).startswith("ours")]
    for r in ours[:40]:
        def c(k, fmt=""):
            v = r.get(k)
            return "-" if v is None else format(v, fmt)
        last = c("speedup_vs_best_incumbent", ".2f") if "ms" in r else (r.get("error") or "-")[:60]
        out.append(f"| {r.get('case', '-')} | {r.get('dtype')} | {r.get('N')} | {r.get('P')} | {r.get('D')} | "
                   f"{r.get('causal')} | {r.get('mode')} | {r.get('impl')} | {c('ms', '.3f')} | {c('tflops', '.1f')} | "
                   f"{last} |")
    if len(ours) > 40:
        out.append(f"({len(ours) - 40} more rows of ours in results.md)")
    return out


def e2e(folder: str) -> list[str]:
    text = read(os.path.join(folder, "results.json"))
    doc = json.loads(text).get("e2e") if text else None
    if not doc:
        return ["end to end: no rows (call 2's e2e step has not run into this folder)"]
    out = [f"end to end: {'complete' if doc['meta'].get('complete') else 'INCOMPLETE'}"]
    out += [f"- target {t['case']} {t['metric']} {t['target']}: ours/PEFT "
            f"{'-' if t['ratio_ours_over_peft'] is None else format(t['ratio_ours_over_peft'], '.3f')}, "
            f"{'not measured' if t['met'] is None else ('met' if t['met'] else 'MISSED')}" for t in doc["targets"]]
    for r in doc["rows"]:
        if "tokens_per_s" in r:
            out.append(f"- {r['case']}/{r['impl']}: B {r['batch']}, {r['tokens_per_s']:.0f} tokens/s, "
                       f"step {r['median_s']:.3f} s, first call {r['first_call_s']:.1f} s"
                       + ("" if r.get("peak_mb") is None else f", peak {r['peak_mb']:.0f} MB"))
        else:
            out.append(f"- {r['case']}: {(r.get('skipped') or r.get('error') or '')[:120]}")
    return out


def summary(folder: str, max_chars: int = 10000) -> str:
    parts = ["## gpu summary: " + folder, "", *steps(folder), *sanitizer(folder), *tier(folder), "",
             *triton_cache(folder), "", *e2e(folder), "", *suite(folder)]
    text = "\n".join(parts)
    if len(text) > max_chars:
        text = text[:max_chars - 60].rsplit("\n", 1)[0] + "\n(summary cut at --max-chars; the files have the rest)"
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder")
    ap.add_argument("--max-chars", type=int, default=10000)
    args = ap.parse_args(argv)
    print(summary(args.folder, args.max_chars))
    return 0


if __name__ == "__main__":
    sys.exit(main())
