#!/usr/bin/env bash
# Install lookalike with its test extras into .venv and run the test suite twice: every test on
# SQLite, then the tests marked `storage` on PostgreSQL 15 (a throwaway cluster the tests start,
# or the server LOOKALIKE_TEST_DATABASE_URL names). Extra args go to both pytest runs.
# LOOKALIKE_TEST_POSTGRES=0 skips the PostgreSQL pass.
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
# The Ray cluster tests run their nodes in a network namespace of their own (ip netns).
if ! command -v ip >/dev/null && [ "$(id -u)" = 0 ]; then
  apt-get update -qq && apt-get install -y -qq iproute2 >/dev/null
fi
[ -d .venv ] || python3 -m venv .venv
.venv/bin/pip install --quiet --disable-pip-version-check -e ".[test]"

echo "== every test, on SQLite"
.venv/bin/python -m pytest "$@"

if [ "${LOOKALIKE_TEST_POSTGRES:-1}" = 0 ]; then
  echo "== PostgreSQL pass skipped (LOOKALIKE_TEST_POSTGRES=0)"
  exit 0
fi
echo "== the storage tests, on PostgreSQL"
# --database=postgres keeps only the tests marked storage; exit status 5 means the arguments
# selected none of them (say, a single SQLite-only test file), which is no failure.
status=0
.venv/bin/python -m pytest -m storage --database=postgres "$@" || status=$?
if [ "$status" != 0 ] && [ "$status" != 5 ]; then
  exit "$status"
fi
