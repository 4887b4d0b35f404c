#!/usr/bin/env bash
# One-time set-up on a fresh machine: a virtual environment in .venv with the pinned dependencies and appleswap
# installed in editable mode. Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.appleswap-deps
want=$(cat requirements.txt requirements-nodeps.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r requirements.txt
  .venv/bin/python -m pip install -q --no-deps -r requirements-nodeps.txt
  .venv/bin/python -m pip install -q --no-deps --no-build-isolation -e .
  echo "$want" > "$stamp"
fi

# The web UI's browser test needs Debian's chromium + chromium-driver (~3 min to install). CI installs them; a
# developer opts in with APPLESWAP_BROWSER=1. Without them that one test is skipped.
if { [ "${CI:-}" = "true" ] || [ "${APPLESWAP_BROWSER:-}" = "1" ]; } && ! command -v chromedriver >/dev/null 2>&1 \
   && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
    || echo "bootstrap: could not install chromium; the browser test will be skipped" >&2
fi
