#!/usr/bin/env bash
# Installs the Debian packages the tests drive when they are missing: DCMTK plays the scanner,
# Orthanc the PACS, dicom3tools' dciodvfy validates our objects, Chromium drives the dashboard,
# redis-server stands in when no Redis answers on 127.0.0.1:6379, PostgreSQL's initdb/pg_ctl give the
# job-store tests a private cluster when no server answers on 127.0.0.1:5432.
set -euo pipefail
need=()
command -v storescu >/dev/null 2>&1 || need+=(dcmtk)
command -v dciodvfy >/dev/null 2>&1 || need+=(dicom3tools)
command -v Orthanc >/dev/null 2>&1 || need+=(orthanc)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v openssl >/dev/null 2>&1 || need+=(openssl)  # test certificates for the DICOM TLS tests
# Orthanc's DICOMweb plugin (STOW-RS delivery tests) and pixelmed's validators (SR, SEG, SC).
compgen -G '/usr/share/orthanc/plugins/libOrthancDicomWeb.so*' >/dev/null || need+=(orthanc-dicomweb)
command -v DicomSRValidator >/dev/null 2>&1 || need+=(pixelmed-apps)
# npm fetches OHIF's built viewer for the viewer test and the demo (deploy/dev/ensure_ohif.sh).
command -v npm >/dev/null 2>&1 || need+=(npm)
# PostgreSQL: the job-store tests use the server on 127.0.0.1:5432 when one answers, otherwise they
# start a private cluster with Debian's /usr/lib/postgresql/*/bin/initdb (tests/conftest.py).
if ! timeout 2 bash -c 'exec 3<>/dev/tcp/127.0.0.1/5432' 2>/dev/null \
   && ! compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null; then
  need+=(postgresql)
fi
# A docker client without the compose plugin: Debian's standalone docker-compose validates the
# deployment file (no Docker engine is needed for `config`).
if command -v docker >/dev/null 2>&1 && ! docker compose version >/dev/null 2>&1; then
  command -v docker-compose >/dev/null 2>&1 || need+=(docker-compose)
fi
if [ ${#need[@]} -eq 0 ]; then exit 0; fi
echo "installing Debian packages: ${need[*]}"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
# apt_install.sh waits for another apt/dpkg holding the package locks (SYNTHPERF_APT_LOCK_TIMEOUT).
bash "$(dirname "$0")/apt_install.sh" "${need[@]}"
# Debian's orthanc package starts a system service on 4242/8042; tests start their own on free ports.
if printf '%s\n' "${need[@]}" | grep -qx orthanc; then
  (service orthanc stop || true) >/dev/null 2>&1
fi
# Debian's postgresql package starts a system cluster on 5432; tests start their own on a free port.
if printf '%s\n' "${need[@]}" | grep -qx postgresql; then
  ($SUDO service postgresql stop || true) >/dev/null 2>&1
fi
