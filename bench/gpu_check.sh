#!/usr/bin/env bash
# Every GPU check in one go, for a GPU machine that has torch/torchvision but not this project's
# other dependencies: install the wheels carried in .whl/ and .gpu-bundle/wheels/ (if any), run
# the device-path unit tests on CUDA, bench/gpu.py, then, when .gpu-bundle/ was carried
# (bench/gpu_bundle.py pack), the real broker on the carried Java runtime and
# bench/through_broker.py: photos/s through Kafka with 1, 2 and 4 service processes on the GPU.
# Results go to $OUT (or out/bench).
#   bash bench/gpu_check.sh                     (about 8 minutes on an H100/H200)
#   GPU_CHECKS=broker bash bench/gpu_check.sh   only the broker figure (about 3 minutes)
# Tried on a CPU machine (no java on the PATH, so the carried runtime is used):
#   GPU_CHECKS=broker GPU_BROKER_DEVICE=cpu GPU_BROKER_MODEL=mobilenet_v3_small GPU_BROKER_PROCESSES=1,2 \
#     GPU_BROKER_PHOTOS=256 GPU_BROKER_MEMORY_PHOTOS=128 bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-out/bench}"
checks="${GPU_CHECKS:-tests,gpu,broker}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
wheels=$(compgen -G ".whl/*.whl"; compgen -G ".gpu-bundle/wheels/*.whl")
if [[ -n "$wheels" ]] && ! python3 -c "import aiokafka, pydantic_settings" 2>/dev/null; then
  # shellcheck disable=SC2086
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $wheels || exit 1
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$out/nvidia-smi.csv"
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
if [[ ",$checks," == *,tests,* ]]; then
  SHELFMATCH_TEST_DEVICE=cuda timeout 180 python3 -m pytest tests/unit/test_device_path.py -q -p no:cacheprovider \
    2>&1 | tee "$out/device-tests.log" | tail -n 15
fi
if [[ ",$checks," == *,gpu,* ]]; then
  timeout "${GPU_BENCH_TIMEOUT:-420}" python3 bench/gpu.py --device cuda --out "$out/gpu.json" "$@" 2>&1 | tee "$out/gpu.log"
fi
if [[ ",$checks," == *,broker,* ]]; then
  if command -v java >/dev/null; then
    echo "java on the machine: $(java -version 2>&1 | head -n 1)"
  elif [[ -f .gpu-bundle/jre.tar.xz ]]; then
    python3 bench/gpu_bundle.py unpack .cache && export PATH="$PWD/.cache/jre/bin:$PATH"
  else
    echo "no Java here and no .gpu-bundle/ carried: the broker figure is not measured (bench/gpu_bundle.py pack)"
    exit 0
  fi
  timeout "${GPU_BROKER_TIMEOUT:-300}" python3 bench/through_broker.py --device "${GPU_BROKER_DEVICE:-cuda}" \
    --model "${GPU_BROKER_MODEL:-resnet50}" \
    --processes "${GPU_BROKER_PROCESSES:-1,2,4}" --photos "${GPU_BROKER_PHOTOS:-12000}" --producers 4 \
    --memory-photos "${GPU_BROKER_MEMORY_PHOTOS:-6400}" --out "$out/broker.json" 2>&1 | grep -v "Got error produce response" | tee "$out/broker.log"
fi
