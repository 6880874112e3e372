#!/bin/sh
# Builds the agents' virtual environment: the build stage of images/Containerfile runs
# it, and so does tests/unit/test_image.py, so the image and its test cannot drift.
#
#   images/build-venv.sh VENV SRC
#
# SRC holds what the Containerfile copies: pyproject.toml, README.md, agents/.
# PYTHON (default python3) is the base interpreter the venv is made from.
set -eu
venv=$1
src=$2
python=${PYTHON:-python3}
here=$(dirname "$0")

# pip runs from a throwaway venv of its own (ensurepip, offline) and installs into
# the agents' venv through --python (pip >= 22.3): the agents' venv never holds
# pip, setuptools or wheel. The project's build backend (setuptools) lives only in
# pip's isolated build environment.
installer=$(mktemp -d)
"$python" -m venv "$installer"
"$python" -m venv --without-pip "$venv"
# --no-compile: bytecode is written below, once, for what the prune keeps.
"$installer/bin/pip" --python "$venv/bin/python" install --no-compile "$src[kube]"
rm -rf "$installer"

"$venv/bin/python" "$here/prune.py" venv

# Bytecode stays: the root filesystem is read-only (and PYTHONDONTWRITEBYTECODE=1),
# so without it every start compiles every module it imports again (measured in
# images/README.md: about twice the start time). unchecked-hash: the sources never
# change in the image, and the .pyc files do not depend on file times (reproducible
# layers; COPY need not keep mtimes).
"$venv/bin/python" -m compileall -q -j 0 --invalidation-mode unchecked-hash "$venv/lib"
