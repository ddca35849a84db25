#!/usr/bin/env bash
# One device call: time the formulations of the 16-bit-logit kernels at 2^28
# (benchmarks/formulations.py; ACCURACY=1 adds their errors on the device, REPEATS=N the
# samples, DTYPES and NCU_DTYPES the dtype pairs), then let Nsight Compute count what the
# fused kernels execute, per SASS instruction, at 2^26.
#
#   bash experiments/probe_gpu.sh OUT_DIR [VARIANT_REGEX] [NCU_VARIANTS]
#   python -m experiments.sass_summary OUT_DIR/sass.csv 26     # afterwards, anywhere
#
# Writes OUT_DIR/formulations.log (+ json), OUT_DIR/ncu.txt (per-kernel summary),
# OUT_DIR/sass.csv (ncu's source page: SASS with executed counts) and OUT_DIR/stalls.csv.
set -uo pipefail
out=${1:?OUT_DIR}
only=${2:-lean|grad-only}
ncu_only=${3:-current,lean-div-rows-512}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
mkdir -p "$out"
python3 -m experiments.formulations --log2n 28 --repeats ${REPEATS:-20} --dtypes "${DTYPES:-bf16/bool,bf16/int8}" \
    --only "$only" ${ACCURACY:+--accuracy} --out "$out/f" 2>&1 | grep -v "^  sass" | tee "$out/formulations.log"
cp "$out/f/formulations.json" "$out/f/hlo.tar.gz" "$out/" && rm -rf "$out/f"
metrics=$(python3 -c "from experiments.ncu_summary import METRICS; print(METRICS)")
ncu --clock-control none --metrics "$metrics" --csv --page raw -k regex:reduce \
    python3 -m experiments.profile_kernels --log2n 26 --dtypes "${NCU_DTYPES:-bf16/bool}" --only "$ncu_only" \
    >"$out/ncu.csv" 2>"$out/ncu.err"
python3 -m experiments.ncu_summary "$out/ncu.csv" 26 | tee "$out/ncu.txt"
ncu --clock-control none --section SourceCounters --section WarpStateStats \
    -k regex:reduce --launch-skip 0 -o "$out/rep" \
    python3 -m experiments.profile_kernels --log2n 26 --dtypes "${NCU_DTYPES:-bf16/bool}" --only "$ncu_only" \
    >>"$out/ncu.err" 2>&1
ncu -i "$out/rep.ncu-rep" --page source --print-source sass --csv >"$out/sass.csv" 2>>"$out/ncu.err"
ncu -i "$out/rep.ncu-rep" --page details --csv >"$out/stalls.csv" 2>>"$out/ncu.err"
rm -f "$out/ncu.csv" "$out/rep.ncu-rep"
ls -la "$out"; tail -5 "$out/ncu.err"
