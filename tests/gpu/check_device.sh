#!/usr/bin/env bash
# One prepared check of every GPU path, for a machine with a CUDA device (run from the repository root):
#     bash tests/gpu/check_device.sh
# Prints one line per check ("check NAME: ok|FAIL|skipped: detail") and exits 1 if any check failed. It installs the
# project with --no-deps over the torch the machine already has (a GPU host may have no network and its own torch
# build). Without a CUDA device it says so in one line and exits 0 ("skipped"). Budget: under 5 minutes.
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}

reason=$("$PY" - <<'PY' 2>&1
try:
    import torch
except Exception as exc:
    print(f"torch cannot be imported ({type(exc).__name__})")
else:
    print("" if torch.cuda.is_available() else f"torch {torch.__version__} sees no CUDA device")
PY
)
if [ -n "$reason" ]; then
  echo "check_device: skipped: no CUDA device here ($reason)"
  exit 0
fi

if ! "$PY" -m pip install -q --no-deps --no-build-isolation -e . -e plugins/dspark-example-backend >/tmp/dspark-install.log 2>&1; then
  echo "check install: FAIL: pip install --no-deps -e . (see /tmp/dspark-install.log)"
  exit 1
fi
echo "check install: ok: $("$PY" -c 'import dspark_lab; print(dspark_lab.__version__)') over torch $("$PY" -c 'import torch; print(torch.__version__)')"
exec timeout 285 "$PY" tests/gpu/check_device.py
