#!/usr/bin/env bash
# The demo: set-up (Debian packages, .venv), then a simulated node where the
# three agents act as their own processes (a severed FUSE mount healed, a GPU pod
# over its share stopped, a token refreshed against a local IdP) while a real
# Prometheus scrapes them. Cleans up after itself, also on Ctrl-C. See hack/demo.py.
set -euo pipefail
cd "$(dirname "$0")/.."
hack/setup.sh
exec .venv/bin/python -m hack.demo "$@"
