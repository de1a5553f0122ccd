#!/usr/bin/env bash
# Installs Debian packages (arguments) with apt-get, waiting for another apt/dpkg that holds the
# package locks (unattended upgrades, a second `make test`) instead of failing on "Could not get lock".
# Shared by ensure_tools.sh (test tools) and ensure_image_tools.sh (podman, debootstrap).
# Wait limit: SYNTHPERF_APT_LOCK_TIMEOUT seconds (default 600).
set -euo pipefail
if [ $# -eq 0 ]; then
  echo "usage: apt_install.sh PACKAGE..." >&2
  exit 2
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
lock_timeout=${SYNTHPERF_APT_LOCK_TIMEOUT:-600}
apt_waiting() {
  local deadline=$((SECONDS + lock_timeout)) out rc said=""
  while true; do
    set +e
    out=$($SUDO apt-get -o DPkg::Lock::Timeout="$lock_timeout" "$@" 2>&1)
    rc=$?
    set -e
    if [ $rc -eq 0 ]; then return 0; fi
    if ! grep -qiE 'could not get lock|unable to acquire the dpkg|is another process using it' <<<"$out"; then
      printf '%s\n' "$out" >&2
      return $rc
    fi
    if [ $SECONDS -ge $deadline ]; then
      printf '%s\n' "$out" >&2
      echo "apt_install: another apt/dpkg process still holds the package lock after ${lock_timeout} s;" \
           "let it finish (ps aux | grep -E 'apt|dpkg') or raise SYNTHPERF_APT_LOCK_TIMEOUT, then try again" >&2
      return 75
    fi
    [ -n "$said" ] || echo "apt_install: waiting for another apt/dpkg process to release its lock (up to ${lock_timeout} s)"
    said=1
    sleep 5
  done
}
apt_waiting update -qq
apt_waiting install -y -qq --no-install-recommends "$@" >/dev/null
