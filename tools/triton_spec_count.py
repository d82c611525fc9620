"""Count the Triton kernel specialisations a pytest selection would compile on a GPU, on a CPU.

    TRITON_INTERPRET=1 PREFIX_ATTN_TEST_BACKENDS=triton PYTHONPATH=tools \\
        python -m pytest -q -p triton_spec_count -m gpu_tier tests/

On a GPU each new specialisation of a kernel costs a JIT compile (1-3 s, cold cache), and in a
short test run the compiles, not the FLOPs, are the time. Triton keys a compile on the constexpr
values and launch options plus, per runtime argument, its type and specialisation: an integer
equal to 1 becomes a constant, one divisible by 16 (and a pointer aligned to 16 bytes) is marked
so; i32 or i64 by value. This plugin wraps the interpreter's launch, computes that key with
Triton's own `native_specialize_impl`, and prints the distinct keys per kernel at the end.

With TRITON_SPEC_COUNT_ONLY=1 the kernels are not run (the tests then fail, but launch what
they would): a count in seconds rather than the interpreter's minutes. With
TRITON_SPEC_COUNT_VERBOSE=1 it also lists, per test, the specialisations it was first to launch.

The interpreter's tile sizes differ from the GPU's, but both are fixed by (kernel, dtype, head-dim
block), which the key already holds, so the count carries over. Not modelled: the prefix-gradient
chunk count depends on the GPU's SM count (a chunk count of 1 writes in the prefix dtype, more
write float32 partials), and CUDA allocations are 512-byte aligned where CPU ones may not be.
"""
from __future__ import annotations

import collections
import inspect
import os

_keys = collections.defaultdict(set)
_new_by_test = collections.Counter()
_current = {"test": None}


def _spec_key(fn, args, kwargs):
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    sig = inspect.signature(fn)
    bound = sig.bind_partial(*args, **{k: v for k, v in kwargs.items() if k in sig.parameters})
    key = []
    for name, param in sig.parameters.items():
        if name not in bound.arguments:
            continue
        value = bound.arguments[name]
        if "constexpr" in str(param.annotation):
            key.append((name, "constexpr", repr(value)))
        else:
            key.append((name,) + tuple(native_specialize_impl(BaseBackend, value, False, True, True)))
    options = tuple(sorted((k, repr(v)) for k, v in kwargs.items() if k not in sig.parameters))
    return tuple(key) + options


def pytest_configure(config):
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise RuntimeError("triton_spec_count: set TRITON_INTERPRET=1 (it counts the interpreter's launches)")
    from triton.runtime.interpreter import InterpretedFunction

    run = InterpretedFunction.run
    count_only = os.environ.get("TRITON_SPEC_COUNT_ONLY") == "1"

    def counting_run(self, *args, grid, warmup, **kwargs):
        key = _spec_key(self.fn, args, kwargs)
        if key not in _keys[self.fn.__name__]:
            _keys[self.fn.__name__].add(key)
            _new_by_test[_current["test"]] += 1
        if count_only:
            return None
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = counting_run


def pytest_runtest_setup(item):
    _current["test"] = item.nodeid


def pytest_terminal_summary(terminalreporter):
    total = sum(len(v) for v in _keys.values())
    terminalreporter.write_sep("-", f"Triton specialisations a GPU would compile: {total}")
    for name in sorted(_keys):
        terminalreporter.write_line(f"{name}: {len(_keys[name])}")
    if os.environ.get("TRITON_SPEC_COUNT_VERBOSE") == "1":
        for test, n in _new_by_test.most_common():
            terminalreporter.write_line(f"{n:4d} new  {test}")
