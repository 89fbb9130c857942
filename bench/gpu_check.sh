#!/usr/bin/env bash
# Every GPU check in one go, for a GPU machine that has torch/torchvision but not this project's
# other dependencies: install the wheels carried in .whl/ (if any), run the device-path unit tests
# on CUDA, then bench/gpu.py. Results go to $OUT (or out/bench).
#   bash bench/gpu_check.sh            (about 5 minutes on an H100/H200)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-out/bench}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$out/nvidia-smi.csv"
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
SHELFMATCH_TEST_DEVICE=cuda timeout 180 python3 -m pytest tests/unit/test_device_path.py -q -p no:cacheprovider \
  2>&1 | tee "$out/device-tests.log" | tail -n 15
timeout "${GPU_BENCH_TIMEOUT:-420}" python3 bench/gpu.py --device cuda --out "$out/gpu.json" "$@" 2>&1 | tee "$out/gpu.log"
