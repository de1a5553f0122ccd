#!/usr/bin/env bash
# Fetches OHIF's built viewer (the npm package @ohif/app ships dist/; nothing is built here) for the
# viewer test (tests/integration/test_viewer_ohif.py) and `make run`'s demo PACS. Pinned version and
# integrity: the tarball's sha512 must equal OHIF_INTEGRITY or nothing is installed. Cached in
# .tools/ohif-<version>/dist (gitignored); a second run does nothing.
set -euo pipefail
OHIF_VERSION=3.13.2
OHIF_INTEGRITY='sha512-WZdxmpmG7rqFgW9ZJLcbgr3XCtLi1KDNPoMaeY5PPe6j4G4fjEjjkycZM6C6Zk2F87BKxFfpq+jd5xXZB9E8EA=='
root=$(cd "$(dirname "$0")/../.." && pwd)
tools=${SYNTHPERF_TOOLS_DIR:-$root/.tools}
dest=$tools/ohif-$OHIF_VERSION
if [ -f "$dest/dist/index.html" ] && [ "$(cat "$dest/INTEGRITY" 2>/dev/null)" = "$OHIF_INTEGRITY" ]; then
  exit 0
fi
if ! command -v npm >/dev/null 2>&1; then
  echo "ensure_ohif: npm is needed to fetch @ohif/app@$OHIF_VERSION (Debian: apt-get install npm)" >&2
  exit 1
fi
echo "fetching OHIF viewer @ohif/app@$OHIF_VERSION (about 50 MB)"
mkdir -p "$tools"
work=$(mktemp -d "$tools/.ohif-fetch.XXXXXX")
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack "@ohif/app@$OHIF_VERSION" --silent >/dev/null)
tarball="$work/ohif-app-$OHIF_VERSION.tgz"
got="sha512-$(openssl dgst -sha512 -binary "$tarball" | base64 -w0)"
if [ "$got" != "$OHIF_INTEGRITY" ]; then
  echo "ensure_ohif: integrity mismatch for @ohif/app@$OHIF_VERSION: got $got, pinned $OHIF_INTEGRITY" >&2
  exit 1
fi
mkdir -p "$work/x"
tar -xzf "$tarball" -C "$work/x" package/dist
test -f "$work/x/package/dist/index.html"
rm -rf "$dest"
mkdir -p "$dest"
mv "$work/x/package/dist" "$dest/dist"
printf '%s' "$OHIF_INTEGRITY" >"$dest/INTEGRITY"
echo "OHIF viewer $OHIF_VERSION in $dest/dist"
