"""Where a result came from: the project's commit, the machine, the software.

One commit rule for every result file: tools/project_commit.py ($PREFIX_ATTN_COMMIT, this
project's own git with `-dirty` when tracked code changed (benchmarks/results excluded), the
`.commit` stamp in a copy without .git, else "unknown"). It is imported, not re-implemented.

One hardware name, which names the results folder: `cpu-<model>-<isa>` or `<gpu name>`. The ISA
level is part of a CPU's name because two machines that report the same model can differ in what
the kernels may use (an AMD EPYC VM with AVX-512 and one with AVX2 only gave different results).
"""
from __future__ import annotations

import datetime
import importlib.metadata
import importlib.util
import os
import platform
import re
from typing import Any

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESULTS = os.path.join(ROOT, "benchmarks", "results")

# Highest first: the first flag /proc/cpuinfo lists names the level.
ISA_LEVELS = (("amx_tile", "amx"), ("avx512f", "avx512"), ("avx2", "avx2"))


def _project_commit_module():
    spec = importlib.util.spec_from_file_location("project_commit", os.path.join(ROOT, "tools", "project_commit.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def commit() -> str:
    try:
        return _project_commit_module().project_commit()
    except Exception:  # noqa: BLE001 - a result without a commit still beats no result
        return "unknown"


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields from /proc/cpuinfo ({} where there is none)."""
    out: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                out[key.strip()] = value.strip()
    except OSError:
        pass
    return out


def cpu_model() -> str:
    return _cpuinfo().get("model name") or platform.processor() or platform.machine() or "unknown-cpu"


def isa_level(flags: str | None = None) -> str:
    """amx, avx512, avx2, or the machine's architecture when it has none of them."""
    have = set((_cpuinfo().get("flags", "") if flags is None else flags).split())
    return next((level for flag, level in ISA_LEVELS if flag in have), platform.machine().lower() or "unknown")


def slug(text: str) -> str:
    s = re.sub(r"\((r|tm|c)\)", "", text.lower())
    s = re.sub(r"\b(cpu|processor|with radeon graphics)\b", "", s)
    s = re.sub(r"@.*$", "", s)
    return re.sub(r"[^a-z0-9]+", "-", s).strip("-") or "unknown"


def hardware_slug(device: torch.device | str = "cpu", model: str | None = None, isa: str | None = None) -> str:
    """The results folder's name: `nvidia-h200`, `cpu-amd-epyc-avx512`, ..."""
    if torch.device(device).type == "cuda":
        return re.sub(r"[^a-z0-9]+", "-", (model or torch.cuda.get_device_name()).lower()).strip("-")
    return f"cpu-{slug(model or cpu_model())}-{isa or isa_level()}"


def results_dir(device: torch.device | str = "cpu") -> str:
    return os.path.join(RESULTS, hardware_slug(device))


def loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _version(dist: str):
    """An installed distribution's version, read from its metadata: importing triton or peft only
    to ask would cost seconds, which a benchmark run to a deadline does not have."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: torch.device | str = "cpu", backend: str | None = None) -> dict[str, Any]:
    """Everything a result file records about where it ran. `backend`: the prefix_attn backend
    asked for, to record what `auto` resolves to."""
    device = torch.device(device)
    env: dict[str, Any] = {
        "commit": commit(), "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "slug": hardware_slug(device), "device": str(device), "cpu_model": cpu_model(), "isa": isa_level(),
        "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "host": platform.node(),
        "platform": platform.platform(), "python": platform.python_version(), "loadavg_at_start": loadavg(),
        "versions": {m: _version(m) for m in ("torch", "triton", "transformers", "peft", "prefix_attn")},
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    if backend is not None:
        import prefix_attn

        env["available_backends"] = list(prefix_attn.available_backends())
        env["backend_requested"] = backend
        try:
            env["backend_used"] = (str(prefix_attn.select_backend(torch.zeros(1, 1, 1, 64, device=device)))
                                   if backend == "auto" else backend)
        except Exception as e:  # noqa: BLE001 - report, don't fail: the table still means something
            env["backend_used"] = f"error: {type(e).__name__}: {e}"
    return env


def describe(env: dict[str, Any]) -> str:
    """One line for a table's header."""
    dev = env.get("gpu") or f"{env['cpu_model']} ({env['isa']}, {env['cpu_cores']} cores, {env['torch_threads']} threads)"
    backend = f"; backend {env['backend_used']}" if "backend_used" in env else ""
    return f"{dev}; torch {env['versions']['torch']}{backend}; {env['date']}; commit {env['commit']}"
