"""Logs every Triton compile request as a cache hit or a miss, for `make gpu-check` (tools/gpu_check.sh
puts this folder first on PYTHONPATH and sets PREFIX_ATTN_TRITON_LOG).

With a prepared cache (build/triton-cache, `make triton-cache`) every request should be a hit: a
miss means the key differed (another Triton build, other options, another kernel source or
specialisation) and names the kernel, so the first GPU run shows whether the keys matched. One
line per request, `hit NAME` or `miss NAME`, appended by every process (pytest-xdist workers
included: each asks once per specialisation). Triton's knobs.compilation.listener reports
cache_hit since Triton 3.4; with an older Triton, or under TRITON_INTERPRET=1, nothing is logged.

A sitecustomize shadows any other on the path (tools/fake_cuda has one): the next one found
after this folder is run too.
"""
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))


def _install(path):
    try:
        from triton import knobs
    except Exception:  # noqa: BLE001 - no Triton, or one without knobs: nothing to log
        return
    if not hasattr(knobs, "compilation") or not hasattr(knobs.compilation, "listener"):
        return

    def listener(**kw):  # keywords only, whatever this Triton passes: a listener must never break a compile
        metadata = kw.get("metadata") or {}
        name = getattr(kw.get("src"), "name", None) or metadata.get("name", "?")
        hit = kw.get("cache_hit")
        line = f"{'hit' if hit else ('miss' if hit is not None else 'compile')} {name} {metadata.get('hash', '')[:16]}\n"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line.encode())  # one write per line: whole lines from concurrent processes
            finally:
                os.close(fd)
        except OSError:
            pass

    knobs.compilation.listener = listener


def _chain():
    """Run the next sitecustomize on sys.path, as if this one were not there."""
    for entry in sys.path:
        if not entry or os.path.abspath(entry) == _HERE:
            continue
        candidate = os.path.join(entry, "sitecustomize.py")
        if os.path.isfile(candidate):
            import runpy

            runpy.run_path(candidate, run_name="sitecustomize")
            return


_chain()
if os.environ.get("PREFIX_ATTN_TRITON_LOG") and os.environ.get("TRITON_INTERPRET", "0") != "1":
    _install(os.environ["PREFIX_ATTN_TRITON_LOG"])
