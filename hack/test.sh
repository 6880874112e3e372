#!/usr/bin/env bash
# The whole test suite: set-up, lint (ruff), types (mypy --strict on agents/),
# import boundaries (import-linter), then pytest. Tests that need root skip
# without it; CI runs as root, where they must run.
#
# As root, the image is built once from images/Containerfile while the linters
# run (python -m hack.image --prebuild, $NODE_AGENTS_IMAGE_DIR): the host pass
# tests that build, the VM pass runs it with containerd.
#
# On a kernel without autofs the tests marked `autofs` (real automount) run in
# a second pass, at the same time, in a VM whose kernel has it (hack/vm.py);
# both passes must pass.
set -euo pipefail
cd "$(dirname "$0")/.."
hack/setup.sh

image_pid= vm_pid= vm_log=
cleanup() {
  # Their own process groups (setsid): an interrupted run stops buildah and qemu too.
  for pid in $image_pid $vm_pid; do kill -- -"$pid" 2>/dev/null || true; done
  if [ -n "${NODE_AGENTS_IMAGE_DIR:-}" ]; then
    .venv/bin/python -m hack.image --remove "$NODE_AGENTS_IMAGE_DIR" || true
    rm -f "$NODE_AGENTS_IMAGE_DIR.log"
  fi
  [ -z "$vm_log" ] || rm -f "$vm_log"
}
trap cleanup EXIT

if [ "$(id -u)" -eq 0 ]; then
  cache=${NODE_AGENTS_CACHE:-/var/cache/node-agents-tests}
  mkdir -p "$cache"
  NODE_AGENTS_IMAGE_DIR=$(mktemp -d "$cache/run-image.XXXXXX")
  export NODE_AGENTS_IMAGE_DIR
  setsid .venv/bin/python -m hack.image --prebuild "$NODE_AGENTS_IMAGE_DIR" \
    >"$NODE_AGENTS_IMAGE_DIR.log" 2>&1 &
  image_pid=$!
fi

echo "== ruff"
.venv/bin/ruff check agents tests hack
.venv/bin/ruff format --check agents tests hack
echo "== mypy"
.venv/bin/mypy
echo "== import boundaries"
.venv/bin/lint-imports

if [ -n "$image_pid" ]; then
  echo "== the image (python -m hack.image --prebuild)"
  if wait "$image_pid"; then
    cat "$NODE_AGENTS_IMAGE_DIR.log"
  else
    cat "$NODE_AGENTS_IMAGE_DIR.log"
    # Its tests then build it themselves (or skip, or fail in CI, saying why).
    echo "== the image build failed; the image tests build it again"
    .venv/bin/python -m hack.image --remove "$NODE_AGENTS_IMAGE_DIR" || true
    unset NODE_AGENTS_IMAGE_DIR
  fi
  image_pid=
fi

if grep -qw autofs /proc/filesystems; then
  echo "== pytest"
  .venv/bin/pytest "$@"
  exit
fi

# pytest's 5 (no test selected) is fine for one pass when the other ran tests.
# The two passes run at once, to keep the whole run within CI's 15 minutes:
# the VM pass writes to a log, printed after the host pass.
vm_log=$(mktemp /tmp/node-agents-vm-pass.XXXXXX)
echo "== pytest -m autofs, in a VM with Debian's kernel (python -m hack.vm): started, its output follows the host pass"
vm_started=$SECONDS
setsid .venv/bin/python -m hack.vm -- .venv/bin/pytest -m autofs -p no:cacheprovider "$@" >"$vm_log" 2>&1 &
vm_pid=$!
echo "== pytest (this kernel has no autofs: the tests marked autofs run in the VM)"
host=0
NODE_AGENTS_AUTOFS_IN_VM=1 .venv/bin/pytest -m "not autofs" "$@" || host=$?
vm=0
wait "$vm_pid" || vm=$?
vm_pid=
echo "== pytest -m autofs, in the VM ($((SECONDS - vm_started)) s since it started):"
cat "$vm_log"
echo "== host pass: exit $host; VM pass: exit $vm"
if [ "$host" -eq 5 ] && [ "$vm" -eq 5 ]; then exit 5; fi
for code in "$host" "$vm"; do
  if [ "$code" -ne 0 ] && [ "$code" -ne 5 ]; then exit "$code"; fi
done
