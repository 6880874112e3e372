#!/usr/bin/env bash
# The whole test suite: set-up, lint (ruff), types (mypy --strict on agents/),
# import boundaries (import-linter), then pytest. Tests that need root skip
# without it; CI runs as root, where they must run.
#
# On a kernel without autofs the tests marked `autofs` (real automount) run in
# a second pass, in a VM whose kernel has it (hack/vm.py); both passes must pass.
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
if grep -qw autofs /proc/filesystems; then
  echo "== pytest"
  exec .venv/bin/pytest "$@"
fi

# pytest's 5 (no test selected) is fine for one pass when the other ran tests.
echo "== pytest (this kernel has no autofs: the tests marked autofs run in a VM after this)"
host=0
NODE_AGENTS_AUTOFS_IN_VM=1 .venv/bin/pytest -m "not autofs" "$@" || host=$?
echo "== pytest -m autofs, in a VM with Debian's kernel (python -m hack.vm)"
vm=0
.venv/bin/python -m hack.vm -- .venv/bin/pytest -m autofs -p no:cacheprovider "$@" || vm=$?
echo "== host pass: exit $host; VM pass: exit $vm"
if [ "$host" -eq 5 ] && [ "$vm" -eq 5 ]; then exit 5; fi
for code in "$host" "$vm"; do
  if [ "$code" -ne 0 ] && [ "$code" -ne 5 ]; then exit "$code"; fi
done
