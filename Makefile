# normd — the user's entry point. `make test` and `make demo` work on a fresh Debian 12 machine.
BUILD_DIR ?= build
JOBS ?= 2
CMAKE_FLAGS ?=

.PHONY: all deps build test demo bench test-image clean

all: build

deps:
	@deploy/install-deps.sh all

$(BUILD_DIR)/CMakeCache.txt:
	cmake -S . -B $(BUILD_DIR) -DCMAKE_BUILD_TYPE=Release $(CMAKE_FLAGS)

build: deps $(BUILD_DIR)/CMakeCache.txt
	cmake --build $(BUILD_DIR) -j$(JOBS)

test: build
	ctest --test-dir $(BUILD_DIR) --output-on-failure -j$(JOBS)

# Builds the container image with podman and runs it (deploy/test-image.sh; root, ~10 min).
test-image:
	deploy/test-image.sh

demo: build
	@client/demo.sh $(BUILD_DIR)

# Benchmarks (bench/, BENCHMARKS.md): kernels, normd against PyTorch in-process and over gRPC,
# RPC load and memory; prints the tables (~4 min on 2 cores).
bench: build
	/usr/bin/python3 bench/compare_torch.py --build-dir $(BUILD_DIR) --load

clean:
	rm -rf $(BUILD_DIR)
