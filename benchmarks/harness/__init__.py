"""The benchmark harness every script in benchmarks/ stands on.

    timer       one interleaved timer (CUDA events or perf_counter), medians, how busy the CPU was
    memory      one peak-memory measurer per device (CUDA: max_memory_allocated in process;
                CPU: peak RSS in a fresh process)
    provenance  the commit (tools/project_commit.py), the hardware name with the CPU's ISA level
    report      one writer: markdown table + JSON + PNG
    attention   the kernels' shapes, passes, FLOP counts, incumbents, and `measure`
    models      the model benchmarks' cases, building, measuring (prefix / prompt tuning against PEFT)

The scripts put benchmarks/ on sys.path and `import harness`.
"""
