#!/usr/bin/env bash
# Create .venv at the repository root (once) and install the given requirements file into it.
# Re-installs only when the requirements change; sourced by demo.sh and test.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REQ="${1:-requirements.txt}"
VENV="${VENV:-$ROOT/.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$VENV"
fi
STAMP="$VENV/.installed-$(basename "$REQ")"
WANT="$(cat "$ROOT/requirements.txt" "$ROOT/$REQ" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  echo "Installing $REQ into $VENV ..."
  # The demo's set-up skips byte-compiling all of torch (~50 s on 2 cores); the import below compiles what it uses.
  NO_COMPILE=""
  if [ "$REQ" = requirements.txt ]; then NO_COMPILE=--no-compile; fi
  if ! "$VENV/bin/python" -m pip install -q --disable-pip-version-check $NO_COMPILE -r "$ROOT/$REQ" \
      >"$VENV/pip.log" 2>&1; then
    grep -v "^WARNING: Location" "$VENV/pip.log" | tail -n 20 >&2
    echo "set-up failed: pip could not install $REQ (full log: $VENV/pip.log)" >&2
    exit 1
  fi
  if [ -n "$NO_COMPILE" ]; then
    PYTHONDONTWRITEBYTECODE= "$VENV/bin/python" -c "import torch, numpy, tokenizers, tqdm, safetensors, matplotlib.pyplot"
  fi
  echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
