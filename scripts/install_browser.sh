#!/usr/bin/env bash
# Install what the web-page test needs, idempotently: Debian's Chromium and Playwright's Python package
# (the browser is Debian's; `playwright install` is never run).
set -euo pipefail
if [ ! -x /usr/bin/chromium ]; then
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends chromium
fi
python -c "import playwright" 2>/dev/null || python -m pip install playwright
