#!/usr/bin/env bash
# Install (first run only) and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh" requirements-dev.txt
cd "$ROOT"
# The chat page's browser test drives Debian's headless Chromium and its chromedriver: install them when missing
# and this user may (root, or sudo without a password); otherwise say which test is skipped and how to enable it.
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ] && sudo -n true 2>/dev/null; then SUDO="sudo -n"; fi
  if { [ "$(id -u)" -eq 0 ] || [ -n "$SUDO" ]; } && command -v apt-get >/dev/null; then
    echo "Installing chromium and chromium-driver for the chat page's browser test ..."
    if ! { $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q \
           && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
                chromium chromium-driver; } >/tmp/minimind-chromium-install.log 2>&1; then
      echo "note: apt-get could not install chromium (log: /tmp/minimind-chromium-install.log);" \
           "tests/test_chat_page.py will be skipped" >&2
    fi
  else
    echo "note: tests/test_chat_page.py is skipped without Chromium; enable it with:" \
         "sudo apt-get install chromium chromium-driver" >&2
  fi
fi
python -m pytest -q tests "$@"
