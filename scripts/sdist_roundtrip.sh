#!/usr/bin/env bash
# sdist round trip, as a new user on a fresh machine would go (run by .ci/run):
#   1. a clean venv WITHOUT torch builds the sdist (python -m build --sdist --no-isolation);
#   2. the sdist holds the csrc headers, the tests with their helpers, the LICENSE, and no build outputs;
#   3. torch==2.14.1 goes into that venv, and a wheel is built from the UNPACKED sdist
#      (FASTDISTILL_BUILD_CUDA=0: C++ kernels only, to keep CI short);
#   4. the wheel installs there, and outside any source tree fastdistill imports, _C loads with its
#      build record, and a C++ op runs on the cpp backend;
#   5. the packaging and foundation tests run from the unpacked sdist against the installed wheel.
# Usage: scripts/sdist_roundtrip.sh [WORKDIR]   (default: a temporary folder, removed at the end;
# a given WORKDIR is kept). Honours MAX_JOBS. Prints the time of each step.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-python3}"
TORCH_SPEC="${FASTDISTILL_ROUNDTRIP_TORCH:-torch==2.14.1}"
if [[ $# -ge 1 ]]; then
  WORK="$1"; mkdir -p "$WORK"
else
  WORK="$(mktemp -d "${TMPDIR:-/tmp}/fastdistill-sdist.XXXXXX")"
  trap 'rm -rf "$WORK"' EXIT
fi
START=$SECONDS
LAST=$SECONDS
step() { echo "[sdist round trip] $* (step $((SECONDS - LAST)) s, total $((SECONDS - START)) s)"; LAST=$SECONDS; }
fail() { echo "[sdist round trip] FAILED: $*" >&2; exit 1; }

# --- 1. sdist, in a clean venv that has no torch --------------------------------------------------
rm -rf "$WORK/venv" "$WORK/dist" "$WORK/src" "$WORK/wheels"
"$PY" -m venv "$WORK/venv"
# shellcheck disable=SC1091
source "$WORK/venv/bin/activate"
python -m pip install -q --upgrade pip "setuptools>=77" build
python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is not None)" \
  || fail "the clean venv has torch; the sdist must build without it"
step "clean venv without torch"
python -m build --sdist --no-isolation --outdir "$WORK/dist" "$ROOT" > "$WORK/sdist.log" 2>&1 \
  || { tail -40 "$WORK/sdist.log"; fail "python -m build --sdist"; }
SDIST="$(ls "$WORK"/dist/fastdistill-*.tar.gz)"
step "built $(basename "$SDIST") without torch"

# --- 2. what the sdist holds -------------------------------------------------------------------
tar -tzf "$SDIST" | sed 's|^[^/]*/||' | sort > "$WORK/sdist-files.txt"
need=(LICENSE README.md MANIFEST.in pyproject.toml setup.py _build_backend.py conftest.py
      tests/conftest.py tests/_examples.py fastdistill/demo/assets/teacher_digits16.pt)
while IFS= read -r f; do need+=("$f"); done < <(cd "$ROOT" && find csrc kernels tests -type f \
  \( -name '*.h' -o -name '*.cpp' -o -name '*.cu' -o -name '*.py' \) -not -path '*/__pycache__/*')
for f in "${need[@]}"; do
  grep -qxF "$f" "$WORK/sdist-files.txt" || fail "the sdist lacks $f"
done
if grep -E '\.so$|\.pyc$|^fastdistill/_build_info\.py$' "$WORK/sdist-files.txt"; then
  fail "the sdist holds build outputs (above)"
fi
grep -q '^License-Expression: Apache-2.0$' <(tar -xzOf "$SDIST" --wildcards '*/PKG-INFO') \
  || fail "PKG-INFO has no License-Expression: Apache-2.0"
step "sdist holds ${#need[@]} required files (csrc headers, tests and helpers, LICENSE), no build outputs"

# --- 3. wheel from the unpacked sdist ----------------------------------------------------------
mkdir -p "$WORK/src"
tar -xzf "$SDIST" -C "$WORK/src"
SRC="$(ls -d "$WORK"/src/fastdistill-*)"
python -m pip install -q "$TORCH_SPEC" ninja
step "installed $TORCH_SPEC and ninja into the clean venv"
(cd "$SRC" && FASTDISTILL_BUILD_CUDA=0 python -m pip wheel --no-build-isolation --no-deps -w "$WORK/wheels" .) \
  > "$WORK/wheel.log" 2>&1 || { tail -40 "$WORK/wheel.log"; fail "pip wheel from the unpacked sdist"; }
WHEEL="$(ls "$WORK"/wheels/fastdistill-*.whl)"
python -m zipfile -l "$WHEEL" > "$WORK/wheel-files.txt"
grep -q 'fastdistill/_C\..*\.so' "$WORK/wheel-files.txt" || fail "the wheel has no fastdistill/_C"
grep -q 'fastdistill/_build_info.py' "$WORK/wheel-files.txt" || fail "the wheel has no build record"
grep -q 'fastdistill/kernels/' "$WORK/wheel-files.txt" || fail "the wheel has no fastdistill.kernels"
step "built $(basename "$WHEEL") from the unpacked sdist (FASTDISTILL_BUILD_CUDA=0)"

# --- 4. install and import, outside any source tree --------------------------------------------
python -m pip install -q "$WHEEL"
step "installed the wheel"
(cd "$WORK" && python - <<'EOF'
import os
import warnings

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import torch

    import fastdistill
    from fastdistill import _extension, dispatch
ours = [str(w.message) for w in caught if w.category.__module__.startswith("fastdistill")]
assert not ours, ours  # no rebuild-guard or fallback warning from a fresh install

assert "site-packages" in fastdistill.__file__, fastdistill.__file__
assert _extension.is_loaded(), _extension.load_error()
assert "site-packages" in _extension.location(), _extension.location()
record = _extension.recorded_build()
assert record == dict(_extension.running_build(), with_cuda=False), record
assert not _extension.compiled_with_cuda()
ops = _extension.registered_ops()
assert {"moment_dot", "segment_route"} <= set(ops), ops
a, b = [torch.randn(7), torch.randn(3, 5)], [torch.randn(7), torch.randn(3, 5)]
with dispatch.record_backends() as seen:
    got = fastdistill.moment_dot(a, b)
    routing = fastdistill.segment_route(torch.tensor([9, 0, 4, 2]), [0, 3, 10])
assert seen == {("moment_dot", "cpp"), ("segment_route", "cpp")}, seen
want = sum(float((x.double() * y.double()).sum()) for x, y in zip(a, b))
assert abs(float(got) - want) < 1e-4 * max(1.0, abs(want)), (float(got), want)
assert routing.permutation.tolist() == [1, 3, 0, 2], routing
print(f"fastdistill {fastdistill.__version__} from {os.path.dirname(fastdistill.__file__)}: _C built against "
      f"torch {record['torch_version']}, ops {', '.join(ops)}; moment_dot and segment_route ran on cpp")
EOF
) || fail "importing the installed wheel"
(cd "$WORK" && fastdistill info > "$WORK/info.txt") || { cat "$WORK/info.txt"; fail "fastdistill info"; }
step "import, _C and a C++ op from the installed wheel"

# --- 5. the sdist's tests against the installed wheel -------------------------------------------
python -m pip install -q "pytest>=8"
# Run from outside the unpacked folder, with the pytest script (not `python -m pytest`) and
# --import-mode=importlib: the source folder stays off sys.path (of pytest and of the subprocesses the
# tests start), so `import fastdistill` is the installed wheel.
(cd "$WORK" && FASTDISTILL_BUILD_CUDA=0 pytest -q -p no:cacheprovider --import-mode=importlib \
  --rootdir "$SRC" -c "$SRC/pyproject.toml" "$SRC/tests/test_packaging.py" "$SRC/tests/test_foundation.py") \
  || fail "tests from the sdist against the wheel"
step "tests from the unpacked sdist passed against the installed wheel"
deactivate
echo "[sdist round trip] OK in $((SECONDS - START)) s"
