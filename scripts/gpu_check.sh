#!/usr/bin/env bash
# What a 10-minute slot on an H100/H200 should do, in at most 9 minutes end to end:
#
#   scripts/gpu_check.sh OUTDIR            # on the GPU machine, from the repository root
#   scripts/gpu_check.sh --dry-run OUTDIR  # every stage's plumbing on a CPU, tiny budgets (CI runs it)
#
# Stages (each under `timeout` with its own budget; when a budget runs out the stage is stopped, the
# summary says TIMED OUT and the next stage runs):
#   install   TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 pip install --no-build-isolation --no-deps -e .
#             (the image has every dependency; nothing is fetched from outside)
#   info      fastdistill info
#   selftest  fastdistill selftest --quick --json OUTDIR/selftest.json
#   tests     python -m pytest -m gpu tests (the GPU tests and the op tests on CUDA tensors), with a
#             per-test timeout when pytest-timeout is installed
#   race      python scripts/race_check.py --device cuda --json OUTDIR/race.json: the atomic backward paths
#             (fused_rdd_loss, attention_kl, fused_attention) run twice: max |run1 - run2| reported, both
#             against float64; under torch.use_deterministic_algorithms(True) the runs must be bit-identical
#   bench     python bench/report.py --quick --out OUTDIR/bench (headline case of every op; ceilings
#             measured in the same run; it stops starting new cases before its budget runs out)
#   audit     python scripts/compile_audit.py --subset --arch 90 (when the script exists)
# Everything is written under OUTDIR: one log per stage (NN-stage.log), selftest.json, race.json, bench/*.json|md|png,
# audit/*.md and summary.txt, the table printed last.
#
# Budgets in seconds can be overridden per stage: GPU_CHECK_BUDGET_INSTALL=200, ..._INFO, ..._SELFTEST,
# ..._TESTS, ..._RACE, ..._BENCH, ..._AUDIT (the test of the dry run sets one to 1 to see TIMED OUT reported).
# PYTHON picks the interpreter (default: python).
set -u

DRY=0
if [ "${1:-}" = "--dry-run" ]; then
  DRY=1
  shift
fi
if [ $# -ne 1 ]; then
  echo "usage: scripts/gpu_check.sh [--dry-run] OUTDIR" >&2
  exit 2
fi
OUTDIR=$1
mkdir -p "$OUTDIR" || exit 2
OUTDIR=$(cd "$OUTDIR" && pwd)
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python}
export PYTHONUNBUFFERED=1

# Default budgets: 130 + 20 + 110 + 110 + 40 + 100 + 30 = 540 s = 9 minutes. The selftest compiles (and
# autotunes) every Triton kernel first; the tests and race stages reuse Triton's on-disk cache it leaves behind.
if [ $DRY -eq 1 ]; then
  B_INSTALL=30; B_INFO=60; B_SELFTEST=120; B_TESTS=120; B_RACE=120; B_BENCH=150; B_AUDIT=60
else
  B_INSTALL=130; B_INFO=20; B_SELFTEST=110; B_TESTS=110; B_RACE=40; B_BENCH=100; B_AUDIT=30
fi
B_INSTALL=${GPU_CHECK_BUDGET_INSTALL:-$B_INSTALL}
B_INFO=${GPU_CHECK_BUDGET_INFO:-$B_INFO}
B_SELFTEST=${GPU_CHECK_BUDGET_SELFTEST:-$B_SELFTEST}
B_TESTS=${GPU_CHECK_BUDGET_TESTS:-$B_TESTS}
B_RACE=${GPU_CHECK_BUDGET_RACE:-$B_RACE}
B_BENCH=${GPU_CHECK_BUDGET_BENCH:-$B_BENCH}
B_AUDIT=${GPU_CHECK_BUDGET_AUDIT:-$B_AUDIT}

SUMMARY=()
T_START=$(date +%s)
N=0

# stage NAME BUDGET COMMAND: runs COMMAND (a bash string) under timeout, log in OUTDIR/NN-NAME.log.
# Sets STATUS (ok / FAILED / TIMED OUT), SECS and LOG.
stage() {
  local name=$1 budget=$2 cmd=$3 rc t0
  N=$((N + 1))
  LOG="$OUTDIR/$(printf '%02d' "$N")-$name.log"
  echo "=== [$name] budget ${budget}s: $cmd" | tee "$LOG"
  t0=$(date +%s)
  timeout --kill-after=10 "$budget" bash -c "$cmd" >>"$LOG" 2>&1
  rc=$?
  SECS=$(($(date +%s) - t0))
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    STATUS="TIMED OUT"
    echo "=== [$name] TIMED OUT after ${budget}s (stopped; moving on to the next stage)" | tee -a "$LOG"
  elif [ $rc -eq 0 ]; then
    STATUS="ok"
  else
    STATUS="FAILED"
    echo "=== [$name] FAILED (exit status $rc)" | tee -a "$LOG"
  fi
  echo "=== [$name] $STATUS in ${SECS}s" >>"$LOG"
  tail -n 5 "$LOG" | sed "s/^/    /"
}

record() {  # record NAME KEY-NUMBERS
  SUMMARY+=("$(printf '%-9s %-10s %6ss  %s' "$1" "$STATUS" "$SECS" "$2")")
}

# ------------------------------------------------------------------------------------------ install
INSTALL_CMD="TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 $PY -m pip install --no-build-isolation --no-deps -e ."
# pyproject.toml's SPDX license string needs setuptools >= 77. The GPU image cannot reach PyPI: when its
# setuptools is older, carry a wheel in .whl/ (git-ignored; /work/.library/device/README.md, Notes): it is
# put on PYTHONPATH first. The version is printed either way, so an old one is named in the log.
if ls .whl/setuptools-*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --target /tmp/gpu_check_site .whl/setuptools-*.whl \
    && export PYTHONPATH=/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}
fi
cat > "$OUTDIR/check_setuptools.py" <<'PYEOF'
import sys
import setuptools
print("setuptools", setuptools.__version__)
major = int(setuptools.__version__.split(".")[0])
sys.exit(0 if major >= 77 else "setuptools >= 77 is needed (SPDX license in pyproject.toml): carry a wheel in .whl/")
PYEOF
INSTALL_CMD="$PY $OUTDIR/check_setuptools.py && $INSTALL_CMD"
if [ $DRY -eq 1 ]; then
  # The command is printed, not run; the tools it needs must be there.
  stage install "$B_INSTALL" "echo 'would run: $INSTALL_CMD'; $PY $OUTDIR/check_setuptools.py && $PY -m pip --version && { command -v ninja || $PY -c 'import ninja; print(ninja.__file__)'; } && { command -v nvcc || echo 'nvcc: not on PATH (needed on the GPU machine)'; }"
else
  stage install "$B_INSTALL" "$INSTALL_CMD"
fi
key=""
for tool in ninja nvcc; do
  command -v $tool >/dev/null 2>&1 && key="$key$tool ok, " || key="$key$tool MISSING, "
done
grep -q "Successfully installed" "$LOG" && key="${key}installed" || key="${key%, }"
record install "$key"

# ------------------------------------------------------------------------------------------ info
stage info "$B_INFO" "$PY -m fastdistill info"
key=$(grep -m1 -E '^gpu ' "$LOG" | sed 's/  */ /g')
ext=$(grep -m1 -o 'CUDA kernels compiled: .*' "$LOG")
key="${key:-no gpu line}; ${ext:-no extension line}"
record info "$key"

# ------------------------------------------------------------------------------------------ selftest
rm -f "$OUTDIR/selftest.json"
if [ $DRY -eq 1 ]; then
  stage selftest "$B_SELFTEST" "$PY -m fastdistill selftest --device cpu --quick --ops adversarial_losses --json '$OUTDIR/selftest.json'"
else
  stage selftest "$B_SELFTEST" "$PY -m fastdistill selftest --quick --json '$OUTDIR/selftest.json'"
fi
if [ -f "$OUTDIR/selftest.json" ]; then
  key=$($PY -c "import json, sys; d = json.load(open(sys.argv[1])); print(f\"{d['passed']} passed, {d['failed']} failed ({d['environment']['device']})\")" "$OUTDIR/selftest.json" 2>/dev/null)
else
  key="$(grep -c ' ok ' "$LOG") rows ok, $(grep -c ' FAIL ' "$LOG") FAIL before it stopped (no JSON)"
fi
record selftest "$key"

# ------------------------------------------------------------------------------------------ tests
TIMEOUT_FLAG=""
if $PY -c "import pytest_timeout" >/dev/null 2>&1; then
  TIMEOUT_FLAG="--timeout=120"  # one hung kernel fails its test instead of eating the stage
fi
if [ $DRY -eq 1 ]; then
  stage tests "$B_TESTS" "$PY -m pytest -v -p no:cacheprovider $TIMEOUT_FLAG tests/test_foundation.py -k 'assert_close_tolerance or poisoned_outputs'"
else
  stage tests "$B_TESTS" "$PY -m pytest -v -p no:cacheprovider -m gpu $TIMEOUT_FLAG tests"
fi
# Counted from the -v lines, so the numbers survive a stage that was stopped at its budget.
passed=$(grep -cE '(PASSED|XPASS)( |$)' "$LOG")
failed=$(grep -cE '(FAILED|ERROR)( |$)' "$LOG")
skipped=$(grep -cE 'SKIPPED( |$)' "$LOG")
record tests "$passed passed, $failed failed/errors, $skipped skipped${TIMEOUT_FLAG:+ (per-test $TIMEOUT_FLAG)}"

# ------------------------------------------------------------------------------------------ race
# The interpreter runs one program at a time, so the CPU suite cannot see races between atomics: here
# the atomic paths run twice on the GPU (the dry run checks the plumbing on CPU, where nothing races).
rm -f "$OUTDIR/race.json"
if [ $DRY -eq 1 ]; then
  stage race "$B_RACE" "$PY scripts/race_check.py --device cpu --json '$OUTDIR/race.json'"
else
  stage race "$B_RACE" "$PY scripts/race_check.py --device cuda --json '$OUTDIR/race.json'"
fi
if [ -f "$OUTDIR/race.json" ]; then
  key=$($PY -c "
import json, sys
rows = json.load(open(sys.argv[1]))['rows']
bad = [r for r in rows if not r['ok']]
fast = max([r['max_abs_diff'] for r in rows if r['mode'] == 'fast'], default=0.0)
det = all(r['bit_identical'] for r in rows if r['mode'] == 'deterministic')
print(f\"{len(rows) - len(bad)} ok, {len(bad)} failed; fast max |run1-run2| {fast:.2e}; deterministic bit-identical: {'yes' if det else 'NO'}\")" "$OUTDIR/race.json" 2>/dev/null)
else
  key="no race.json written"
fi
record race "$key"

# ------------------------------------------------------------------------------------------ bench
BENCH_LEFT=$((B_BENCH > 40 ? B_BENCH - 30 : B_BENCH / 2))  # stop starting cases in time to write results
rm -rf "$OUTDIR/bench"
if [ $DRY -eq 1 ]; then
  stage bench "$B_BENCH" "$PY bench/report.py --quick --out '$OUTDIR/bench' --budget $BENCH_LEFT bench/bench_ceilings.py"
else
  stage bench "$B_BENCH" "$PY bench/report.py --quick --out '$OUTDIR/bench' --budget $BENCH_LEFT"
fi
bjson=$(ls "$OUTDIR"/bench/*.json 2>/dev/null | head -n 1)
if [ -n "$bjson" ]; then
  key=$($PY -c "
import json, sys
d = json.load(open(sys.argv[1]))
rows = d['results']
ok = [r for r in rows if r['ms'] == r['ms']]
sel = d.get('selection', {})
stop = '; ' + sel['stopped'] if sel.get('stopped') else ''
print(f\"{len(ok)}/{len(rows)} timings on {d['device']}{stop}\")" "$bjson" 2>/dev/null)
else
  key="no results written"
fi
record bench "$key"

# ------------------------------------------------------------------------------------------ audit
if [ -f scripts/compile_audit.py ]; then
  if [ $DRY -eq 1 ]; then
    stage audit "$B_AUDIT" "$PY scripts/compile_audit.py --help"
    record audit "command line parsed (--help); the audit itself is not run in a dry run"
  else
    stage audit "$B_AUDIT" "$PY scripts/compile_audit.py --subset --arch 90 --jobs 16 --out '$OUTDIR/audit'"
    record audit "$(grep -v "^===" "$LOG" | tail -n 1 | cut -c1-80)"
  fi
else
  N=$((N + 1)); STATUS="skipped"; SECS=0
  echo "scripts/compile_audit.py not found" >"$OUTDIR/$(printf '%02d' "$N")-audit.log"
  record audit "scripts/compile_audit.py not found"
fi

# ------------------------------------------------------------------------------------------ summary
TOTAL=$(($(date +%s) - T_START))
{
  echo
  echo "gpu_check$([ $DRY -eq 1 ] && echo ' (dry run)') summary: $OUTDIR (total ${TOTAL}s)"
  printf '%-9s %-10s %7s  %s\n' stage status time "key numbers"
  printf '%s\n' "----------------------------------------------------------------------------------"
  printf '%s\n' "${SUMMARY[@]}"
} | tee "$OUTDIR/summary.txt"

# Exit status: 0 only when every stage that ran was ok.
if grep -qE '^[a-z]+ +(FAILED|TIMED OUT)' "$OUTDIR/summary.txt"; then
  exit 1
fi
exit 0
