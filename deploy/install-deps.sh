#!/usr/bin/env bash
# Installs the Debian 12 packages normd needs, only those that are missing.
# Usage: deploy/install-deps.sh [build|test|all]   (default: all)
set -euo pipefail

build_pkgs=(build-essential cmake pkg-config libeigen3-dev libgrpc++-dev libprotobuf-dev
  protobuf-compiler protobuf-compiler-grpc prometheus-cpp-dev libgtest-dev libgmock-dev
  libbenchmark-dev libcli11-dev libspdlog-dev libcurl4-openssl-dev libopenblas-dev libssl-dev
  libopenmpi-dev openmpi-bin  # data-parallel jobs (mpi/, tests/mpi)
  python3-pip python3-setuptools python3-wheel)  # the last three build the Python wheel
# python3-venv and python3-tqdm: the Python wheel's test installs it into a venv that sees
# Debian's grpcio, protobuf, numpy, tqdm and torch (tests/client/wheel_test.py).
test_pkgs=(python3-torch python3-numpy python3-grpcio python3-protobuf python3-sklearn
  libopenblas0-pthread prometheus openssl curl clang libclang-rt-14-dev libomp-dev llvm
  python3-yaml docker-compose python3-venv python3-tqdm python3-scipy)

case "${1:-all}" in
  build) want=("${build_pkgs[@]}") ;;
  test|all) want=("${build_pkgs[@]}" "${test_pkgs[@]}") ;;
  *) echo "usage: $0 [build|test|all]" >&2; exit 2 ;;
esac

missing=()
for p in "${want[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed"; then
    missing+=("$p")
  fi
done
# Node.js may come from outside Debian (nodesource); only ask Debian for it when absent.
if [ "${1:-all}" != build ] && ! command -v npm >/dev/null 2>&1; then
  missing+=(nodejs npm)
fi
if [ ${#missing[@]} -eq 0 ]; then
  echo "deps: all ${#want[@]} packages present"
  exit 0
fi
echo "deps: installing ${missing[*]}"
if [ "$(id -u)" -eq 0 ]; then sudo=""; else sudo="sudo"; fi
$sudo apt-get update -q
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
