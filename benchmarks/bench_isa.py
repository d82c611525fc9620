"""Speed of the CPU kernels' ISA levels against each other and against a -march=native build, on
the CPU benchmark's target shapes (fp32, causal and not; forward, and forward + backward).

    python benchmarks/bench_isa.py --build dispatched=/work/wt21 --build native=/tmp/native/pkg \
        --build avx2=/work/wt21:avx2 [--rounds 7] [--threads 1 --clock cpu] [--json out.json]

Each --build NAME=DIR[:LEVEL] is a directory holding a prefix_attn package (its _C*.so decides
the build) and optionally a level to force (PREFIX_ATTN_CPU_ISA). Two builds of the extension
cannot live in one process (both register the op namespace prefix_attn), so each build runs in a
worker process of its own, started once, and the workers take turns: for every round and
config, each worker times a few calls while the others wait idle (blocked on their pipe), in an
order that rotates from round to round. A busy machine slows whichever worker is running, so
the comparison is made per round and config, and summarised by medians over rounds. The first
build named is the reference of the ratios (reference time / build time: above 1 is faster).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_common import CPU_TARGET_SHAPES  # noqa: E402

PASSES = ("fwd", "train")


def configs():
    return [(shape, causal, mode) for shape in CPU_TARGET_SHAPES for causal in (True, False) for mode in PASSES]


def worker(threads: int, clock: str) -> None:
    """Reads {"config": i, "reps": n} lines, answers with the n call times in ms."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    timer = time.process_time if clock == "cpu" else time.perf_counter

    import prefix_attn
    from prefix_attn import _ops

    cfgs = configs()
    prepared = {}

    def prepare(i):
        (B, H, N, P, D), causal, mode = cfgs[i]
        g = torch.Generator().manual_seed(i)
        q, k, v = (torch.randn(B, H, N, D, generator=g) for _ in range(3))
        pk, pv = (torch.randn(H, P, D, generator=g) for _ in range(2))
        dout = torch.randn(B, H, N, D, generator=g)
        leaves = (q, k, v, pk, pv)
        if mode == "train":
            for t in leaves:
                t.requires_grad_(True)

        def step():
            if mode == "fwd":
                with torch.no_grad():
                    return prefix_attn.prefix_attention(q, k, v, pk, pv, causal=causal, backend="cpu")
            out = prefix_attn.prefix_attention(q, k, v, pk, pv, causal=causal, backend="cpu")
            out.backward(dout)
            for t in leaves:
                t.grad = None
            return out

        step()  # warm-up: first-call costs (allocation, the level's choice) stay out of the times
        return step

    print(json.dumps({"ready": True, "isa": _ops._C._cpu_isa(), "isas": _ops._C._cpu_isas_built(),
                      "so": _ops._C.__file__, "threads": torch.get_num_threads()}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        i = request["config"]
        if i not in prepared:
            prepared[i] = prepare(i)
        times = []
        for _ in range(request["reps"]):
            t0 = timer()
            prepared[i]()
            times.append((timer() - t0) * 1e3)
        print(json.dumps(times), flush=True)


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build", action="append", required=True, help="NAME=DIR[:LEVEL]")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--reps", type=int, default=2, help="calls per worker, round and config")
    parser.add_argument("--json", help="write the raw times and summary here")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: torch's default)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: the worker's CPU time, which other processes on a busy machine disturb less "
                             "than wall time (meant with --threads 1)")
    args = parser.parse_args()

    workers = {}
    for spec in args.build:
        name, _, rest = spec.partition("=")
        path, _, level = rest.partition(":")
        env = dict(os.environ, PYTHONPATH=os.path.abspath(path))
        env.pop("PREFIX_ATTN_CPU_ISA", None)
        if level:
            env["PREFIX_ATTN_CPU_ISA"] = level
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", str(args.threads), args.clock],
                                env=env, text=True,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        info = json.loads(proc.stdout.readline())
        print(f"{name:12s} isa {info['isa']:8s} (built: {','.join(info['isas'])}) threads {info['threads']} "
              f"{info['so']}", flush=True)
        workers[name] = proc

    cfgs = configs()
    names = list(workers)
    times = {name: {i: [] for i in range(len(cfgs))} for name in names}
    print(f"clock {args.clock}, rounds {args.rounds}, calls per round {args.reps} (the fastest kept); "
          f"load average before: {loadavg()}", flush=True)
    for r in range(args.rounds):
        for i in range(len(cfgs)):
            shift = (r + i) % len(names)
            for name in names[shift:] + names[:shift]:
                proc = workers[name]
                proc.stdin.write(json.dumps({"config": i, "reps": args.reps}) + "\n")
                proc.stdin.flush()
                times[name][i].append(min(json.loads(proc.stdout.readline())))
        print(f"round {r + 1}/{args.rounds} done, load average {loadavg()}", flush=True)
    for proc in workers.values():
        proc.stdin.close()
        proc.wait()

    ref = names[0]
    header = f"{'shape (B,H,N,P,D)':22s} {'causal':6s} {'pass':5s}" + "".join(f" {n + ' ms':>14s}" for n in names)
    header += "".join(f" {n + '/' + ref:>18s}" for n in names[1:])
    print(header)
    summary = []
    ratios_all = {n: [] for n in names[1:]}
    for i, (shape, causal, mode) in enumerate(cfgs):
        med = {n: statistics.median(times[n][i]) for n in names}
        # per round: the reference's time over this build's, taken in the same round
        ratios = {n: statistics.median(a / b for a, b in zip(times[ref][i], times[n][i])) for n in names[1:]}
        for n in names[1:]:
            ratios_all[n].append(ratios[n])
        row = f"{str(shape):22s} {str(causal):6s} {mode:5s}" + "".join(f" {med[n]:14.2f}" for n in names)
        row += "".join(f" {ratios[n]:18.3f}" for n in names[1:])
        print(row)
        summary.append({"shape": shape, "causal": causal, "pass": mode, "median_ms": med, "speed_vs_ref": ratios})
    for n in names[1:]:
        geo = statistics.geometric_mean(ratios_all[n])
        print(f"{n}: speed relative to {ref}, geometric mean over the configs {geo:.3f}, "
              f"worst {min(ratios_all[n]):.3f}")
    print(f"load average after: {loadavg()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"builds": args.build, "rounds": args.rounds, "reps": args.reps, "summary": summary,
                       "times_ms": times}, f, indent=1)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(int(sys.argv[2]), sys.argv[3])
    else:
        main()
