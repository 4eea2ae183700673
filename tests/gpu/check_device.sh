#!/usr/bin/env bash
# One prepared check of every GPU path, for a machine with a CUDA device (run from anywhere in the repository):
#     bash tests/gpu/check_device.sh [CHECK ...]
# Prints one line per check ("check NAME: ok|FAIL|skipped: detail") and exits 1 if any check failed. It installs the
# project with --no-deps over the torch the machine already has (a GPU host may have no network and its own torch
# build). Without a CUDA device it says so in one line and exits 0 ("skipped"). The whole script stays under
# 5 minutes: the checks get what is left of TOTAL_S after the probe and the install.
set -uo pipefail
cd "$(dirname "$0")/../.."
# $PYTHON, else the first of python3 / python that imports torch (a conda or venv python may be `python` only)
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for candidate in python3 python; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import torch' >/dev/null 2>&1; then
      PY=$candidate
      break
    fi
  done
  PY=${PY:-python3}
fi
TOTAL_S=290
LOG=$(mktemp -t dspark-install.XXXXXX)

# torch's import and CUDA probe may warn on stderr (an old NumPy, a driver mismatch): only the last stdout line counts
reason=$(PYTHONWARNINGS=ignore "$PY" - 2>/dev/null <<'PY' | tail -n 1
try:
    import torch
except Exception as exc:
    print(f"torch cannot be imported ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
else:
    try:
        ok = torch.cuda.is_available()
    except Exception as exc:
        print(f"torch.cuda.is_available() raised {type(exc).__name__}")
    else:
        print("ok" if ok else f"torch {torch.__version__} sees no CUDA device")
PY
)
if [ "$reason" != "ok" ]; then
  echo "check_device: skipped: no CUDA device here (${reason:-$PY cannot run})"
  exit 0
fi

last_error() {  # the line of pip's log that says why
  grep -E '^(ERROR|error|[A-Za-z]*Error)' "$1" | tail -n 1 || true
}
if ! "$PY" -m pip --version >/dev/null 2>&1; then
  echo "check install: skipped: pip is not available for $PY; using the dspark_lab already installed, if any"
elif ! "$PY" -m pip install -q --no-deps --no-build-isolation --no-input -e . >"$LOG" 2>&1; then
  why=$(last_error "$LOG")
  echo "check install: FAIL: pip install --no-deps -e . (${why:-see $LOG}; offline, the build needs setuptools>=68 installed)"
  exit 1
else
  # the example backend plugin is optional here: a failure only costs its own line
  if ! "$PY" -m pip install -q --no-deps --no-build-isolation --no-input -e plugins/dspark-example-backend >>"$LOG" 2>&1; then
    echo "check example_plugin: skipped: its install failed ($(last_error "$LOG"))"
  fi
  versions=$(PYTHONWARNINGS=ignore "$PY" -c 'import dspark_lab, torch; print(f"{dspark_lab.__version__} over torch {torch.__version__}")' 2>/dev/null | tail -n 1)
  echo "check install: ok: ${versions:-installed (dspark_lab does not import: see the import check)}"
fi

left=$((TOTAL_S - SECONDS - 5))
if [ "$left" -lt 30 ]; then
  echo "check_device: FAIL: the probe and the install took ${SECONDS} s; no time left for the checks"
  exit 1
fi
if command -v timeout >/dev/null 2>&1; then
  DSPARK_CHECK_BUDGET_S=$((left - 10)) exec timeout --kill-after=5 "$left" "$PY" tests/gpu/check_device.py "$@"
fi
DSPARK_CHECK_BUDGET_S=$((left - 10)) exec "$PY" tests/gpu/check_device.py "$@"
