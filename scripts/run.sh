#!/usr/bin/env bash
# Install lookalike into .venv, index a folder of photos and serve it.
#   scripts/run.sh                 # the shipped CC0 sample photos
#   scripts/run.sh ~/Pictures      # your own folder (or LOOKALIKE_PHOTOS=~/Pictures)
# Data goes to $LOOKALIKE_HOME (default ./lookalike-data); HOST and PORT pick the address.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
photos="${1:-${LOOKALIKE_PHOTOS:-$repo/samples/clothing10/images}}"
[ -d "$repo/.venv" ] || python3 -m venv "$repo/.venv"
"$repo/.venv/bin/pip" install --quiet --disable-pip-version-check -e "$repo"
"$repo/.venv/bin/lookalike" index "$photos"
exec "$repo/.venv/bin/lookalike" serve --host "${HOST:-127.0.0.1}" --port "${PORT:-8000}"
