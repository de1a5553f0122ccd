#!/usr/bin/env bash
# Installs what building the images on this machine needs, only when it is missing: podman (builds the
# Dockerfile with --isolation=chroot, no daemon) and debootstrap (makes the local Debian base image,
# since no registry of base images is reachable here). Called by `make images` and by
# tests/integration/test_images.py; `make test` does not install these otherwise.
set -euo pipefail
need=()
command -v podman >/dev/null 2>&1 || need+=(podman)
command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
if [ ${#need[@]} -eq 0 ]; then exit 0; fi
echo "installing Debian packages: ${need[*]}"
bash "$(dirname "$0")/apt_install.sh" "${need[@]}"
