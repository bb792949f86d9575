#!/usr/bin/env bash
# GPU figures in one call (issue 29): run from the repository root on the lent GPU machine.
#   bash benchmarks/gpu/run.sh               -> benchmarks/gpu/results.json and the table on stdout
#   bash benchmarks/gpu/run.sh --cpu-smoke   -> the same code on tiny shapes on CPU (tests run this)
# Other arguments go to benchmarks/gpu/bench_gpu.py (--help lists them).
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TQDM_DISABLE=1
py="${PYTHON:-$(command -v python3 || command -v python)}"
# JAX and PyTorch share the one GPU: neither may take most of its memory up front.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
smoke=0
for arg in "$@"; do [ "$arg" = "--cpu-smoke" ] && smoke=1; done
if [ "$smoke" = 1 ]; then
  export JAX_PLATFORMS=cpu CUDA_VISIBLE_DEVICES=""
else
  # the float64 reference runs in a thread beside the GPU timings: leave a few cores to their host side
  threads=$(( $(nproc) > 8 ? $(nproc) - 4 : $(nproc) ))
  export OMP_NUM_THREADS=$threads OPENBLAS_NUM_THREADS=$threads MKL_NUM_THREADS=$threads
fi
# mergekit and its pure-Python dependencies, where the machine lacks them, carried as wheels (it has no
# network): every wheel in $DRM_JAX_WHEELS (default .whl/) goes to a private folder put on the path
wheels="${DRM_JAX_WHEELS:-.whl}"
if [ "$smoke" = 0 ] && [ -d "$wheels" ] && ! "$py" -c "import mergekit" 2>/dev/null; then
  site="$(mktemp -d)/site"
  if "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$wheels"/*.whl; then
    export PYTHONPATH="$PYTHONPATH:$site"
  else
    echo "the wheels in $wheels did not install; the mergekit rows will say skipped"
  fi
fi
exec "$py" benchmarks/gpu/bench_gpu.py "$@"
