# normd — the user's entry point. `make test` and `make demo` work on a fresh Debian 12 machine.
BUILD_DIR ?= build
JOBS ?= 2
CMAKE_FLAGS ?=

.PHONY: all deps build test demo bench test-image clean test-asan test-fuzz test-tsan python
# The stages of `make test` run one after the other, even under `make -j`.
.NOTPARALLEL:

# Heavy stages of `make test` after the regular suite (tests/sanitizers/README.md):
#   asan  one clang ASan+UBSan build of everything, also instrumented for libFuzzer (NORMD_FUZZ),
#         and the whole ctest suite under it, but the container image test (it builds its own)
#         and the mpirun jobs (label mpi: Open MPI's components leak at MPI_Finalize and are
#         unloaded by then, so LeakSanitizer cannot tell its leaks from ours; the same
#         data-parallel code runs under ASan in core_test's thread-collective tests)
#   fuzz  each fuzz target for FUZZ_SECONDS in that same build (tests/fuzz/run_fuzzers.sh)
#   tsan  a clang TSan build of the concurrency tests, run with `ctest -L concurrency`
# `make test SANITIZERS=0` skips them for a quick local run; `make test-asan` (test-fuzz,
# test-tsan) runs one alone.
SANITIZERS ?= 1
FUZZ_SECONDS ?= 45
ASAN_BUILD_DIR ?= build-asan
TSAN_BUILD_DIR ?= build-tsan
# The targets of the tests labelled `concurrency` (a labelled test whose target is missing here
# is not built in build-tsan, so ctest never sees it).
TSAN_TARGETS = normd_server_registry_test perf_registry_inline_test checkpoint_persistence_test \
	perf_kernels_test sanitizers_concurrency_test
SANITIZER_CMAKE = CC=clang CXX=clang++ cmake -S . -DCMAKE_BUILD_TYPE=RelWithDebInfo \
	"-DCMAKE_CXX_FLAGS_RELWITHDEBINFO=-O1 -g" -DNORMD_BUILD_BENCH=OFF
STAGE = tests/sanitizers/stage.sh
export NORMD_STAGE_LOG = $(abspath $(BUILD_DIR))/stage-times.txt

all: build

deps:
	@deploy/install-deps.sh all

$(BUILD_DIR)/CMakeCache.txt:
	cmake -S . -B $(BUILD_DIR) -DCMAKE_BUILD_TYPE=Release $(CMAKE_FLAGS)

build: deps $(BUILD_DIR)/CMakeCache.txt
	cmake --build $(BUILD_DIR) -j$(JOBS)
	@$(MAKE) --no-print-directory dist/$(WHEEL)

# The Python client as a wheel (client/python/CMakeLists.txt, target normd_wheel), copied to
# dist/. Install: python3 -m venv --system-site-packages .venv && .venv/bin/pip install dist/$(WHEEL)
WHEEL = normd-$(shell awk '/^project.normd VERSION/ {print $$3}' CMakeLists.txt)-py3-none-any.whl
python: deps $(BUILD_DIR)/CMakeCache.txt
	cmake --build $(BUILD_DIR) -j$(JOBS) --target normd_wheel
	@$(MAKE) --no-print-directory dist/$(WHEEL)

dist/$(WHEEL): $(BUILD_DIR)/dist/$(WHEEL)
	@mkdir -p dist && cp $< $@ && echo "dist/$(WHEEL)"

test: deps
	@$(STAGE) --reset
	@$(STAGE) "build" $(MAKE) --no-print-directory build
	@$(STAGE) "tests ($(BUILD_DIR))" ctest --test-dir $(BUILD_DIR) --output-on-failure -j$(JOBS)
ifneq ($(SANITIZERS),0)
	@$(MAKE) --no-print-directory test-asan test-fuzz test-tsan
endif
	@$(STAGE) --summary

test-asan:
	@$(STAGE) "asan+ubsan: build, fuzzers included" sh -c 'mkdir -p $(ASAN_BUILD_DIR) && \
	  $(SANITIZER_CMAKE) -B $(ASAN_BUILD_DIR) -DNORMD_SANITIZE=address -DNORMD_FUZZ=ON \
	    >$(ASAN_BUILD_DIR)/configure.log || { cat $(ASAN_BUILD_DIR)/configure.log; exit 1; }; \
	  cmake --build $(ASAN_BUILD_DIR) -j$(JOBS)'
	@$(STAGE) "asan+ubsan: whole suite" \
	  tests/sanitizers/run_ctest.sh $(ASAN_BUILD_DIR) -j$(JOBS) -LE 'image|mpi'

test-fuzz:
	@$(STAGE) "fuzz: 4 targets x $(FUZZ_SECONDS) s" \
	  tests/fuzz/run_fuzzers.sh $(FUZZ_SECONDS) $(ASAN_BUILD_DIR)

test-tsan:
	@$(STAGE) "tsan: build, concurrency tests" sh -c 'mkdir -p $(TSAN_BUILD_DIR) && \
	  $(SANITIZER_CMAKE) -B $(TSAN_BUILD_DIR) -DNORMD_SANITIZE=thread \
	    >$(TSAN_BUILD_DIR)/configure.log || { cat $(TSAN_BUILD_DIR)/configure.log; exit 1; }; \
	  cmake --build $(TSAN_BUILD_DIR) -j$(JOBS) --target $(TSAN_TARGETS)'
	@$(STAGE) "tsan: ctest -L concurrency" \
	  tests/sanitizers/run_ctest.sh $(TSAN_BUILD_DIR) -j$(JOBS) -L concurrency

# Builds the container image with podman and runs it (deploy/test-image.sh; root, ~10 min).
test-image:
	deploy/test-image.sh

demo: build
	@client/demo.sh $(BUILD_DIR)

# Benchmarks (bench/, BENCHMARKS.md): kernels, normd against PyTorch in-process and over gRPC,
# RPC load and memory; the convolutional networks (the CNN, ResNet-20), their layers and the
# server's memory training ResNet-20 (cnn_bench.py); prints the tables (~4 min on 2 cores, plus
# cnn_bench's ~5 min with the im2col convolutions); a 2-rank data-parallel job against one rank
# and MPI_Allreduce's bandwidth (dp_bench.py, ~3 min).
bench: build
	/usr/bin/python3 bench/compare_torch.py --build-dir $(BUILD_DIR) --load
	/usr/bin/python3 bench/cnn_bench.py --build-dir $(BUILD_DIR)
	/usr/bin/python3 bench/fold_bench.py --build-dir $(BUILD_DIR)
	/usr/bin/python3 bench/drift_quality.py --build-dir $(BUILD_DIR)
	/usr/bin/python3 bench/tenant_fairness.py --build-dir $(BUILD_DIR)
	/usr/bin/python3 bench/dp_bench.py --build-dir $(BUILD_DIR)

clean:
	rm -rf $(BUILD_DIR) dist
