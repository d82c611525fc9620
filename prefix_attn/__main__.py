"""`python -m prefix_attn`: what a bug report needs. Versions (prefix_attn, torch, Triton, CUDA),
how the extension was built and which ISA level its CPU kernels run, the GPU and its
architecture, and each backend with "available" or the reason it is not.

Probing the backends loads the extension, which in a pure-Python install compiles it first
(once per torch version; it says so). --no-probe skips that and the backends."""
from __future__ import annotations

import argparse
import importlib.metadata
import platform
import sys


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def report(probe: bool = True) -> str:
    import torch

    import prefix_attn
    from prefix_attn import _ops, backends

    lines = [
        f"prefix_attn  {prefix_attn.__version__} ({prefix_attn.__file__})",
        f"python       {platform.python_version()} ({sys.executable})",
        f"platform     {platform.platform()}, {platform.machine()}",
        f"torch        {torch.__version__} (CUDA {torch.version.cuda or 'none: a CPU-only build'}, "
        f"ATen CPU capability {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads)",
        f"triton       {_version('triton')}",
    ]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"gpu {i}        {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB")
    else:
        lines.append("gpu          none (torch.cuda.is_available() is False)")
    if probe:
        names = list(backends._REGISTRY)  # probe first: it loads (or compiles) the extension
        reasons = {name: backends.unavailable_reason(name) for name in names}
    if _ops.HAS_EXTENSION:
        has_cuda = _ops._C._has_cuda_kernels()
        lines.append(f"extension    {_ops.BUILD}: {_ops._C.__file__}")
        lines.append(f"             CPU kernels at ISA level {_ops._C._cpu_isa()} (built: "
                     f"{', '.join(_ops._C._cpu_isas_built())}); CUDA kernels {'yes' if has_cuda else 'no'}")
    elif probe:
        lines.append(f"extension    missing: {_ops.why_unavailable()}")
    else:
        lines.append("extension    not installed; compiled at first use (run without --no-probe to try)")
    if probe:
        lines.append("backends     (auto picks the first available one that runs the tensors' device)")
        for name in sorted(names, key=lambda n: -backends._REGISTRY[n].priority):
            lines.append(f"  {name:10s} {'available' if reasons[name] is None else 'not available: ' + reasons[name]}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m prefix_attn", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-probe", action="store_true", help="skip the backends (and any build at first use)")
    args = parser.parse_args(argv)
    print(report(probe=not args.no_probe))
    return 0


if __name__ == "__main__":
    sys.exit(main())
