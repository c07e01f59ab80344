#!/usr/bin/env bash
# The benchmark suite on one GPU machine (H100 / H200), in three parts that each fit one call.
#
#   bash benchmarks/gpu_suite.sh kernels     # issues 3, 6: CUDA tests, kernel suite, compile tests, kernel tests on the device
#   bash benchmarks/gpu_suite.sh generation  # issue 7's pieces: generation on CUDA, NF4 linear, overhead probe
#   bash benchmarks/gpu_suite.sh e2e         # issue 7: end-to-end suite, two 9B groups, compiled decode
#   bash benchmarks/gpu_suite.sh finetune    # low-memory fine-tuning at the 9B shape (ahead of its issue)
#   bash benchmarks/gpu_suite.sh all         # kernels, generation, e2e in one call, within the same $BUDGET:
#                                            # the later steps are skipped once it is spent (one part a call fits)
#
# The wheels in .whl/ are git-ignored: the device call must carry them (`carry: [".whl"]`), or
# bitsandbytes, open_flamingo and xformers are missing there (the nf4, score and open_flamingo e2e
# rows then read n/a); steps.log says so in a WARNING line.
#
# From the repository root. Results go to $WORK (default /tmp/gpu-results) and, packed in one
# file, to $OUT/gpu-results-<part>.tgz when $OUT is set (the device tool brings back 8 files at
# most), packed again after every step: a call cut off by its limit still brings back what the
# finished steps wrote. The script keeps within $BUDGET seconds in all (default 570: a device
# call of timeout_s=600 less the transfers): each step's limit is its own or what is left of the
# budget, and a step with under 20 s left is skipped (steps.log says so). Each call starts
# steps.log with a header line (part, date, code) and each suite's folder afresh (a rerun on a
# warm machine ships no earlier call's table, goals or plots beside its rows).
#
# 1. installs the wheels collected in .whl/ (bitsandbytes, xformers, open_flamingo, open_clip...:
#    ../shared/tools/gpu-wheels.sh hypothesis sortedcontainers attrs) without network, and this
#    package (editable, no deps: the kernels/ folder is installed as fastflamingo.kernels, which a
#    plain PYTHONPATH cannot do);
# 2. kernels, in order of what they decide: the kernels' CUDA tests (pytest -k "cuda or gpu";
#    <= 150 s: every kernel variant compiles on first use, every autotune candidate of the
#    image-causal kernel is checked), `fastflamingo bench --suite kernels` (200 s; GPU time by
#    CUDA-graph replay, the first launch of each shape class autotunes), the compile tests on CUDA
#    (tests/test_compile.py, test_torch_compile_fullgraph*: 60 s), and the kernel test files'
#    other tests, which run the interpreter's cases (edge cases, random layouts, every V of the
#    Perceiver) through the real kernels here (90 s);
# 3. generation: the generation tests on CUDA (tests/test_cuda_generation.py, 180 s: seven
#    compilations of the default generate's step with CUDA graphs, a skipped graph an error;
#    score against its reference on the Triton kernel),
#    `--suite nf4` (75 s), benchmarks/gpu_overhead.py (60 s: launch / dispatch / kernel time
#    of one call) and `--suite score --preset openflamingo-3b` (90 s);
# 4. e2e: `fastflamingo bench --suite e2e` (default on a GPU: the openflamingo-9b shape and the
#    IDEFICS-9B shape, random weights, bf16; rows are kept per finished group; $E2E_GROUPS, e.g.
#    "idefics", runs only those), with one more profiled call per stage: GPU time by kind of
#    kernel in $WORK/breakdown/.
# Every step logs to $WORK/*.log; the script never stops at a failed step. Each suite's folder has
# goals.txt beside its table: the issues' H100 goals its rows decide (met / NOT met / not measured).
set -u
PART=${1:-all}
case "$PART" in kernels|generation|e2e|finetune|all) ;; *) echo "usage: bash benchmarks/gpu_suite.sh kernels|generation|e2e|finetune|all" >&2; exit 2;; esac
WORK=${WORK:-/tmp/gpu-results}
mkdir -p "$WORK"
BUDGET=${BUDGET:-570}
T0=$(date +%s)
echo "=== gpu_suite.sh $PART: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), code $(git rev-parse --short HEAD 2>/dev/null || echo unknown), budget ${BUDGET} s" \
  | tee -a "$WORK/steps.log"
step() { echo "== $(($(date +%s) - T0)) s: $*" | tee -a "$WORK/steps.log"; }
pack() {  # the results so far, in $OUT (overwritten after every step)
  if [ -n "${OUT:-}" ]; then
    tar czf "$OUT/gpu-results-$PART.tgz" -C "$WORK" . && cp "$WORK/steps.log" "$OUT/"
  fi
}
limit() {  # limit <seconds> <name>: the step's own limit, or what the budget leaves (15 s kept to pack)
  local left=$((BUDGET - ($(date +%s) - T0) - 15))
  if [ "$left" -lt 20 ]; then
    echo "== skipped $2: $left s of the ${BUDGET} s budget left" | tee -a "$WORK/steps.log" >&2
    echo 0
  elif [ "$1" -lt "$left" ]; then echo "$1"; else echo "$left"; fi
}

step "install wheels and fastflamingo"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --target .site .whl/*.whl > "$WORK/install.log" 2>&1
  export PYTHONPATH=$PWD/.site:${PYTHONPATH:-}
else
  echo "== WARNING: no .whl/*.whl here (carry .whl in the device call): bitsandbytes, open_flamingo, xformers missing" \
    | tee -a "$WORK/steps.log"
  : > "$WORK/install.log"
fi
if ! python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >> "$WORK/install.log" 2>&1; then
  # no setuptools build here: point the package at kernels/ in this throw-away checkout instead
  ln -sfn ../kernels fastflamingo/kernels
  export PYTHONPATH=$PWD:${PYTHONPATH:-}
fi
export PYTHONUNBUFFERED=1
python3 -c "import json, fastflamingo.info as i; print(json.dumps(i.collect(), indent=1))" > "$WORK/info.json" 2>&1
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv \
  > "$WORK/gpu.csv" 2>&1

bench() {  # bench <suite> <seconds> [options]
  local t; t=$(limit "$2" "$1 suite"); [ "$t" -gt 0 ] || return 0
  step "$1 suite (limit $t s)"
  rm -rf "${WORK:?}/$1"  # this call's rows, table, goals and plots only
  timeout "$t" python3 -m fastflamingo.bench --suite "$1" --out "$WORK/$1" --no-progress "${@:3}" > "$WORK/$1.log" 2>&1
  echo "$1 exit $?" | tee -a "$WORK/steps.log"
  # a suite cut off by its time limit still left rows.json (every suite saves its rows as they
  # come): render its table and plots
  if [ -f "$WORK/$1/rows.json" ] && [ ! -f "$WORK/$1/table.txt" ]; then
    python3 -m fastflamingo.bench --from-json "$WORK/$1/rows.json" --out "$WORK/$1" > /dev/null 2>&1
  fi
  pack
}

tests() {  # tests <name> <seconds> <pytest -k expression> [files]
  local t; t=$(limit "$2" "$1"); [ "$t" -gt 0 ] || return 0
  step "$1 (limit $t s)"
  # (a test module whose imports are missing there, e.g. hypothesis, must not stop the others)
  timeout "$t" python3 -m pytest -q -p no:cacheprovider --continue-on-collection-errors --durations=15 -k "$3" "${@:4}" \
    > "$WORK/$1.log" 2>&1
  echo "$1 exit $?" | tee -a "$WORK/steps.log"
  tail -3 "$WORK/$1.log"
  pack
}

script() {  # script <name> <seconds> <benchmarks/script.py> [options]: writes $WORK/<name>/, logs $WORK/<name>.log
  local t; t=$(limit "$2" "$1"); [ "$t" -gt 0 ] || return 0
  step "$1 (limit $t s)"
  rm -rf "${WORK:?}/$1"
  timeout "$t" python3 "$3" --out "$WORK/$1" "${@:4}" > "$WORK/$1.log" 2>&1
  echo "$1 exit $?" | tee -a "$WORK/steps.log"
  pack
}

if [ "$PART" = kernels ] || [ "$PART" = all ]; then
  tests tests 150 "(cuda or gpu) and not cuda_generate" tests
  bench kernels 200
  # torch.compile(fullgraph=True) over the Triton custom ops (issue 3 asks for it on a GPU too)
  tests compile 60 "(test_compile.py or torch_compile_fullgraph) and not cuda_generate" tests
  tests kernel-tests 90 "not cuda and not gpu and not torch_compile_fullgraph" \
    tests/test_image_causal_kernel.py tests/test_perceiver_kernel.py
fi
if [ "$PART" = generation ] || [ "$PART" = all ]; then
  tests generation 180 "cuda_generate" tests/test_cuda_generation.py
  bench nf4 75
  script overhead 60 benchmarks/gpu_overhead.py
  # scoring candidates vs open_flamingo's eval path (the 3B shape: its check holds an fp32 copy)
  bench score 90 --preset openflamingo-3b
fi
if [ "$PART" = e2e ] || [ "$PART" = all ]; then
  # one more profiled call per end-to-end stage: GPU time by kind of kernel (fastflamingo.bench.breakdown)
  export FASTFLAMINGO_BREAKDOWN="$WORK/breakdown"
  rm -rf "$FASTFLAMINGO_BREAKDOWN"
  bench e2e 540 ${E2E_GROUPS:+--groups "$E2E_GROUPS"}
fi

if [ "$PART" = finetune ]; then
  # peak memory and step time of fine_tune at the OpenFlamingo-9B shape: 16-bit LM + AdamW, checkpointed,
  # and NF4 LM + 8-bit AdamW + checkpointing (the 9B-on-24-GB set-up)
  script finetune 420 benchmarks/finetune_memory.py
fi

step "done"
pack
# the reply carries the end of the output: print the tables last
grep -v "hot_spots" "$WORK/overhead.log" 2>/dev/null | head -20
tail -n 60 "$WORK/kernels/table.txt" "$WORK/nf4/table.txt" "$WORK/score/table.txt" "$WORK/e2e/table.txt" \
  "$WORK/breakdown/breakdown.txt" "$WORK/finetune.log" 2>/dev/null
