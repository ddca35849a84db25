#!/usr/bin/env bash
# Everything a session with one GPU should measure, in one device call (8-10 minutes):
#   1. the guard: value_and_grad and forward tables at 2^28 for every logits/labels dtype
#      pair and option, checked against the targets (benchmarks/report.py), with the
#      compiled HLO of each jaxbce case;
#   2. the fused linear loss at B=4096, H=768, C=2^20 and 2^17, bf16 (benchmarks/linear.py);
#   3. SigLIP at B=65,536, D=768, bf16 (benchmarks/siglip.py);
#   4. the GPU-relevant tests (tests/test_accuracy.py, test_core.py, the new losses);
#   5. the Pallas probe (experiments/pallas_fused.py): one Triton kernel for loss and
#      gradient, with and without FMAs, against jaxbce and a copy at 2^28;
#   6. the compiled kernels for an H100, an H200 and a B200 with this device's jax
#      (benchmarks/fusion.py, compiled without the GPU, as CI does with jax 0.10.2 and
#      the newest; the bench's --dump-hlo already keeps this device's own compile).
# The parts run in this order of importance: bench, pallas, linear, siglip, tests, fusion.
# Each part has its own time limit and log; a part that fails does not stop the others.
# The limits add up to more than a device call's 10 minutes: whatever the call's own
# limit cuts off is the least important part, and OUT still comes back.
#
#   bash benchmarks/gpu_session.sh "$OUT"          # e.g. through the device tool
#
# Then copy OUT/{bench,linear,siglip} into benchmarks/results/gpu/<device>/ and the logs
# beside them, with the date, device and jax version they print.
set -uo pipefail
out=${1:?OUT directory}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; date -u;
  python3 -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices())"; } \
  >"$out/device.txt" 2>&1
cat "$out/device.txt"
run() {  # name, seconds, command...
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  echo "== $name: exit $?"; tail -25 "$out/$name.log"
}
run bench 300 python3 -m benchmarks.bench --gpu --check --dump-hlo --out "$out/bench"
run pallas 120 python3 -m experiments.pallas_fused --time
run linear 120 python3 -m benchmarks.linear --gpu --out "$out/linear"
run siglip 150 python3 -m benchmarks.siglip --gpu --out "$out/siglip"
run tests 150 python3 -m pytest -q -x -p no:cacheprovider tests/test_accuracy.py tests/test_core.py \
  tests/test_linear.py tests/test_siglip.py tests/test_chunked.py -m "not slow"
run fusion 150 python3 -m benchmarks.fusion --check
