#!/usr/bin/env bash
# Install lookalike with its test extras into .venv and run the test suite (extra args go to pytest).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"
# The PostgreSQL tests start a throwaway cluster from Debian's server package.
if [ ! -x /usr/lib/postgresql/15/bin/initdb ] && [ "$(id -u)" = 0 ]; then
  apt-get update -qq && apt-get install -y -qq postgresql >/dev/null
fi
# The web page tests drive Debian's Chromium through Playwright (no browser download).
if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ]; then
  apt-get update -qq && apt-get install -y -qq chromium >/dev/null
fi
[ -d .venv ] || python3 -m venv .venv
.venv/bin/pip install --quiet --disable-pip-version-check -e ".[test]"
exec .venv/bin/python -m pytest "$@"
