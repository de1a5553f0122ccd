#!/usr/bin/env bash
# Installs the Debian packages the tests drive when they are missing: DCMTK plays the scanner,
# Orthanc the PACS, dicom3tools' dciodvfy validates our objects, Chromium drives the dashboard,
# redis-server stands in when no Redis answers on 127.0.0.1:6379.
set -euo pipefail
need=()
command -v storescu >/dev/null 2>&1 || need+=(dcmtk)
command -v dciodvfy >/dev/null 2>&1 || need+=(dicom3tools)
command -v Orthanc >/dev/null 2>&1 || need+=(orthanc)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v openssl >/dev/null 2>&1 || need+=(openssl)  # test certificates for the DICOM TLS tests
# A docker client without the compose plugin: Debian's standalone docker-compose validates the
# deployment file (no Docker engine is needed for `config`).
if command -v docker >/dev/null 2>&1 && ! docker compose version >/dev/null 2>&1; then
  command -v docker-compose >/dev/null 2>&1 || need+=(docker-compose)
fi
if [ ${#need[@]} -eq 0 ]; then exit 0; fi
echo "installing Debian packages: ${need[*]}"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
# Debian's orthanc package starts a system service on 4242/8042; tests start their own on free ports.
if printf '%s\n' "${need[@]}" | grep -qx orthanc; then
  (service orthanc stop || true) >/dev/null 2>&1
fi
