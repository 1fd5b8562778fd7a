#!/usr/bin/env bash
# Every GPU figure of the project in one call on a GPU machine (issues 14 and 21): the bf16/fp16 kernel numerics,
# the document-masked attention benchmark (Triton vs FlexAttention and FA2: the stored result the `auto` backend
# rule reads), training throughput and peak memory of the 1B preset with each attention backend (flex, triton,
# reference) and each recompute mode, and the data build's --workers scaling on the machine's 16 CPU cores. Every
# benchmark stores its record (kernels/bench/record.py) in the one results folder, docs/bench/, packed into
# $OUT/gpu_results.tar.gz after each step; the training runs themselves go to runs/bench_train/.
#
# On a machine whose image lacks deepspeed / megatron-core / orjson / xxhash (the lent H100/H200 image), build
# the wheels first, here, from the repository root with the project's environment active:
#   bash ../shared/tools/device-wheels.sh
#   python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 -d .whl orjson xxhash
# and carry `.whl` with the call; this script installs them into /tmp/site.
#   bash launchers/gpu_session.sh            # OUT defaults to runs/gpu_session
# The step limits add up to 570 s: run it as one device call with timeout_s=600.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_session}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PWD:/tmp/site || { echo "wheel install failed"; exit 1; }
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" | tee "$OUT/versions.txt"
status=0
# Each step runs under its own time limit (seconds; override with the variables) so that one slow or hung step
# cannot spend the others' share of a lease (a device call is at most 600 s), and the results so far are packed
# after every step: a call cut short still brings back every figure taken before the cut. The figures the issue
# asks for come first; the whole kernel suite on the GPU (fp32, the compiled kernels) last.
pack() { tar czf "$OUT/gpu_results.tar.gz" docs/bench 2>/dev/null; }
step() {  # step NAME SECONDS COMMAND...
  local name=$1 secs=$2 rc
  shift 2
  echo "== $name (limit ${secs} s)"
  timeout "$secs" "$@" 2>&1 | tee "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  if [ "$rc" != 0 ]; then
    status=1
    echo "== $name: exit $rc$([ "$rc" = 124 ] && echo ' (its time limit)')" | tee -a "$OUT/$name.log"
  fi
  pack
}
step pytest_gpu "${T_NUMERICS:-75}" python3 -m pytest -q -m gpu tests/kernels
# what `model.attention_backend: auto` reads (kernels/choice.py): Triton vs FlexAttention, numerics checked first
step bench_attention "${T_ATTN:-150}" python3 -m kernels.bench.bench_attention
# the three attention backends training the 1B preset (reference: expect its dense scores to run out of memory)
step bench_train "${T_TRAIN:-160}" python3 launchers/bench_train.py --presets llama3.2-1b \
  --backends flex triton reference --micro-batch-size 4 --global-batch-size 8 --steps 6 --warmup 3
# the recompute modes (peak memory vs tokens/s) on the default backend
step bench_train_recompute "${T_RECOMPUTE:-100}" python3 launchers/bench_train.py --presets llama3.2-1b \
  --backends flex --recompute selective full --micro-batch-size 4 --global-batch-size 8 --steps 6 --warmup 3
# the data build's --workers scaling where there are more than 2 cores (the machine's 16); CPU only
step bench_build "${T_DATA:-40}" python3 -m data_tools.bench_build --formats jsonl,npz --workers 1,2,4,8 \
  --repeats 3
step pytest_kernels "${T_SUITE:-45}" python3 -m pytest -q -x tests/kernels
echo "gpu_session: exit $status (results in docs/bench and $OUT/gpu_results.tar.gz)"
exit $status
