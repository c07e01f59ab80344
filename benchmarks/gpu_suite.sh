#!/usr/bin/env bash
# The whole benchmark suite on one GPU machine (H100 / H200), in under 9 minutes.
#
#   bash benchmarks/gpu_suite.sh            # from the repository root; results in $OUT
#
# 1. installs the wheels collected in .whl/ (bitsandbytes, xformers, open_flamingo, open_clip...:
#    ../shared/tools/gpu-wheels.sh hypothesis sortedcontainers attrs) without network, and this package (editable, no deps: the
#    kernels/ folder is installed as fastflamingo.kernels, which a plain PYTHONPATH cannot do);
# 2. runs the CUDA tests (pytest -k "cuda or gpu"; 120 s: every kernel variant compiles on first use);
# 3. runs `fastflamingo bench` (default on a GPU: the openflamingo-9b shape, random weights, bf16):
#    the kernel, NF4-linear and end-to-end suites as three processes, each with its own time limit,
#    writing rows.csv, rows.json, table.txt and PNG plots to $OUT/kernels, $OUT/nf4 and $OUT/e2e.
# Every step logs to $OUT/*.log; the script never stops at a failed step.
set -u
OUT=${OUT:-$PWD/gpu-results}
mkdir -p "$OUT"
T0=$(date +%s)
step() { echo "== $(($(date +%s) - T0)) s: $*" | tee -a "$OUT/steps.log"; }

step "install wheels and fastflamingo"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --target .site .whl/*.whl > "$OUT/install.log" 2>&1
  export PYTHONPATH=$PWD/.site:${PYTHONPATH:-}
fi
if ! python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >> "$OUT/install.log" 2>&1; then
  # no setuptools build here: point the package at kernels/ in this throw-away checkout instead
  ln -sfn ../kernels fastflamingo/kernels
  export PYTHONPATH=$PWD:${PYTHONPATH:-}
fi
python3 -c "import json, fastflamingo.info as i; print(json.dumps(i.collect(), indent=1))" > "$OUT/info.json" 2>&1
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv \
  > "$OUT/gpu.csv" 2>&1

step "CUDA tests"
# (a test module whose imports are missing there, e.g. hypothesis, must not stop the others)
timeout 120 python3 -m pytest -q -p no:cacheprovider --continue-on-collection-errors tests -k "cuda or gpu" \
  > "$OUT/tests.log" 2>&1
echo "tests exit $?" | tee -a "$OUT/steps.log"
tail -3 "$OUT/tests.log"

step "kernel suite"
timeout 150 python3 -m fastflamingo.bench --suite kernels --out "$OUT/kernels" --no-progress \
  > "$OUT/kernels.log" 2>&1
echo "kernels exit $?" | tee -a "$OUT/steps.log"

step "end-to-end suite"
timeout 200 python3 -m fastflamingo.bench --suite e2e --out "$OUT/e2e" --no-progress > "$OUT/e2e.log" 2>&1
echo "e2e exit $?" | tee -a "$OUT/steps.log"

step "NF4 linear suite"
timeout 45 python3 -m fastflamingo.bench --suite nf4 --out "$OUT/nf4" --no-progress > "$OUT/nf4.log" 2>&1
echo "nf4 exit $?" | tee -a "$OUT/steps.log"

# a suite cut off by its time limit still left rows.json: render its table and plots
for d in kernels nf4 e2e; do
  if [ -f "$OUT/$d/rows.json" ] && [ ! -f "$OUT/$d/table.txt" ]; then
    python3 -m fastflamingo.bench --from-json "$OUT/$d/rows.json" --out "$OUT/$d" > /dev/null 2>&1
  fi
done

step "done"
# the reply carries the end of the output: print the tables last
tail -n 60 "$OUT/kernels/table.txt" "$OUT/nf4/table.txt" "$OUT/e2e/table.txt" 2>/dev/null
