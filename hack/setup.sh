#!/usr/bin/env bash
# Everything the demo and the tests need on a fresh Debian machine, as root:
# Debian packages (real automount, FUSE, squashfs, Prometheus), a virtual
# environment in .venv and the project installed into it with its test extra.
# Safe to run again: it skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

# kubectl renders the kustomizations for the manifest tests (`kubectl
# kustomize`, kustomize v5: the `labels:` field). The machine image's package
# of that name (kubectl 1.32, kustomize v5.5) is the one meant: Debian's own
# `kubernetes-client` (1.20, kustomize v2) is too old to render them.
APT_PACKAGES=(autofs squashfuse squashfs-tools fuse3 prometheus kubectl)
# The real-node tests (tests/realnode): containerd and runc run real containers
# (hybrid cgroups here: runc, not crun), buildah builds the image, podman runs
# it, and debootstrap makes the base root filesystem (hack/base_image.py): no
# image registry is reachable.
APT_PACKAGES+=(containerd runc buildah podman debootstrap)
# A kernel built without autofs cannot mount one: hack/test.sh then runs the
# autofs tests in a qemu VM with Debian's kernel (hack/vm.py fetches that
# kernel and busybox-static itself, with apt-get download).
if ! grep -qw autofs /proc/filesystems; then
  APT_PACKAGES+=(qemu-system-x86)
fi
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  # Any kubectl on PATH will do (one installed from a release binary, too).
  [ "$pkg" = kubectl ] && command -v kubectl >/dev/null && continue
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "hack/setup.sh: need root to install: ${missing[*]}" >&2
    exit 1
  fi
  apt-get update -qq
  # A package no configured source has (kubectl comes with the machine image,
  # not with Debian) is reported, not fatal: the tests that need it say so,
  # and fail in CI.
  installable=()
  for pkg in "${missing[@]}"; do
    if apt-cache show "$pkg" >/dev/null 2>&1; then
      installable+=("$pkg")
    else
      echo "hack/setup.sh: no Debian package $pkg in the configured sources; skipping it" >&2
    fi
  done
  if [ ${#installable[@]} -gt 0 ]; then
    echo "installing Debian packages: ${installable[*]}"
    # policy-rc.d on build machines keeps the packages' services from starting;
    # the tests start their own automount and Prometheus.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${installable[@]}" >/dev/null
  fi
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -e "$stamp" ]; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[test]'
  rm -f .venv/.installed-*
  touch "$stamp"
fi
