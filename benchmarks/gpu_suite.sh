#!/usr/bin/env bash
# Every GPU check and measurement of this project in one call on a lent GPU machine (the
# `device` tool: its image has CuPy, numba-cuda, NumPy, SciPy and xarray, but not dask,
# distributed or zarr, and cannot download).
#
# On the dev machine, once per session (about 13 MB of wheels, ignored by git):
#     bash benchmarks/gpu_suite.sh --fetch-wheels
# Then, through the device tool, from the repository root (about 6-8 minutes):
#     run(command="bash benchmarks/gpu_suite.sh", carry=[".whl"])
# The end of the output is a summary; every step's full log is under $OUT.
#
# Steps: the GPU tests (CuPy against NumPy, the numba.cuda conv program, the fused ReLU kernel);
# the per-pair cost of image nets, GPU kernel against the layer-by-layer CuPy path, with the
# 60k + 10k extrapolation (issue 5's ResNet-32 goal); the dense and ConvNet kernel stages with
# GPU workers (issues 2 and 5).
set -uo pipefail
cd "$(dirname "$0")/.."

WHEELS=(dask==2026.8.0 distributed==2026.8.0 zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1
        google-crc32c==1.9.0 locket==1.0.0 partd==1.4.2 tblib==3.2.2 zict==3.0.0 tornado==6.6.1)

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    exclude=$(git rev-parse --git-path info/exclude)
    mkdir -p "$(dirname "$exclude")"
    grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
    mkdir -p .whl
    # The device image runs Python 3.12 on x86-64 Linux.
    exec python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"
fi

OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || { echo "wheels missing: run --fetch-wheels first"; exit 2; }
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"

summary=()
step() {  # step NAME COMMAND...: run it, keep its log, note its exit status and last line
    local name=$1
    shift
    local start=$SECONDS
    "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    summary+=("$name: exit $rc, $((SECONDS - start)) s: $(tail -n 1 "$OUT/$name.log")")
}

step tests python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_conv.py
step pairs python3 benchmarks/bench_conv_pairs.py --n 256 --repeat 1 --device gpu
step fc_stage python3 benchmarks/bench_fc_kernel.py --n 20000 --depth 3 --workers 1 \
    --tiles 5000,10000 --rounds 1 --skip-naive --nt-python none
step conv_stage python3 benchmarks/bench_conv_kernel.py --n 4000 --tile 1000 --workers 1 \
    --device gpu --nt-python none

echo
cat "$OUT/pairs.log"
grep -E "^\| |median" "$OUT/fc_stage.log"
grep -E "entries_per_s" "$OUT/conv_stage.log"
printf '%s\n' "${summary[@]}"
