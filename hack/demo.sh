#!/usr/bin/env bash
# The demo: set-up (Debian packages, .venv), then a local autofs root with real
# FUSE mounts, one severed by kill -9 and healed live by the agent, metrics shown.
set -euo pipefail
cd "$(dirname "$0")/.."
hack/setup.sh
exec .venv/bin/python -m hack.demo "$@"
