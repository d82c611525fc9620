# Two commands from a fresh clone: `make demo` and `make test`. Both go through `make install`,
# which creates .venv, installs torch (the CPU wheel, before anything else can ask for torch),
# then builds and installs prefix_attn. Stamps keep it quick when nothing changed.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
TORCH  ?= torch==2.13.0

SOURCES := $(shell find csrc prefix_attn -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh') setup.py pyproject.toml

.PHONY: install demo test bench clean

install: $(VENV)/.built

$(VENV)/.deps: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q "setuptools>=64" wheel ninja pybind11 pytest numpy expecttest matplotlib pytest-benchmark triton
	touch $@

$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	$(PIP) install -q --no-build-isolation --no-deps -e .
	touch $@

demo: install
	$(PY) benchmarks/demo.py

# The Triton kernels run on CPU only under the interpreter, which must be switched on before
# Triton is imported: their tests get a process of their own.
test: install
	$(PY) -m pytest -q tests
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests/test_triton.py

bench: install
	$(PY) benchmarks/bench_attention.py

clean:
	rm -rf build *.egg-info prefix_attn/_C*.so $(VENV)/.built
