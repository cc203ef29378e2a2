#!/usr/bin/env bash
# benchmarks/cuda_checks.py on a machine with one GPU and no package registry, from the repository
# root: the wheels in .whl (pydantic and its needs, for Python 3.12) go beside the machine's torch;
# .mlm holds a Megatron-LM checkout of core_v0.16.1, patched with `fr-megatron patch` (its
# megatron.core serves the recipe too). The results and the jobs' logs go to $OUT.
# ONLY=ranks,... runs some of the checks. Both are prepared where git and pip reach the network:
#   git clone --depth 1 --branch core_v0.16.1 https://github.com/NVIDIA/Megatron-LM .mlm
#   fr-megatron patch --megatron-lm .mlm
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform \
#       manylinux2014_x86_64 -d .whl pydantic pydantic-core annotated-types typing-inspection
set -u
OUT=${OUT:-/tmp/cuda_checks_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:$PWD/.mlm:/tmp/site PYTHONUNBUFFERED=1 GLOO_SOCKET_IFNAME=lo
# Megatron-LM's start-up runs `nvcc -V` under torch's CUDA_HOME
python3 -c 'import sys, torch.utils.cpp_extension as c; sys.exit(c.CUDA_HOME is None)' || {
    mkdir -p /tmp/fake_cuda/bin
    printf '#!/bin/sh\necho "Cuda compilation tools, release 13.0, V13.0.0"\n' >/tmp/fake_cuda/bin/nvcc
    chmod +x /tmp/fake_cuda/bin/nvcc; export CUDA_HOME=/tmp/fake_cuda; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
df -h /dev/shm | tail -1
python3 -m benchmarks.cuda_checks --only "${ONLY:-cuda_start,ranks,instances,megatron_lm,snapshot_cost}" \
    --megatron-lm .mlm --work /tmp/cc --results "$OUT/cuda_checks.json"
rc=$?
# the jobs' logs and reports (not their tensors) come back for reading
(cd /tmp/cc && find . \( -name 'log.txt' -o -name 'report.json' -o -name 't.json' \) -print \
    | tar -czf "$OUT/logs.tar.gz" -T -) 2>/dev/null
exit $rc
