#!/usr/bin/env bash
# The whole test suite: set-up, lint (ruff), types (mypy --strict on agents/),
# import boundaries (import-linter), then pytest. Tests that need root skip
# without it; CI runs as root, where they must run.
set -euo pipefail
cd "$(dirname "$0")/.."
hack/setup.sh
echo "== ruff"
.venv/bin/ruff check agents tests hack
.venv/bin/ruff format --check agents tests hack
echo "== mypy"
.venv/bin/mypy
echo "== import boundaries"
.venv/bin/lint-imports
echo "== pytest"
exec .venv/bin/pytest "$@"
