#!/usr/bin/env bash
# Builds the Dockerfile's CPU targets on this machine, where no registry of base images answers:
#   1. a Debian bookworm root filesystem from `debootstrap --variant=minbase` (the Debian mirror of
#      this machine's apt sources), kept as a tarball and imported into podman as the local base;
#   2. `podman build --isolation=chroot` of each target (default: service worker-cpu) on that base.
# The smoke checks (deploy/images/smoke_check.py) run as RUN steps, since this sandbox refuses
# `podman run`. Everything is kept under SYNTHPERF_IMAGES_DIR (default var/images: the rootfs tarball
# and podman's own store, so layers are cached from one build to the next; `make clean` drops it).
# The CUDA target (worker-gpu) needs the NVIDIA base image and is not built here.
#
# A TARGET is any stage of the Dockerfile but worker-gpu. Besides the runtime targets, the cheap
# stages `requirements` (the list of runtime dependencies) and `build` (python3 from Debian and our
# package's wheel) can be built alone: no dcmtk, no 2.2 GB of dependencies, no smoke check. `make test`
# builds only those two (tests/integration/test_images.py); its full form and `make images` build the
# runtime targets. A stage no runtime target asks for is built only when named (podman skips unused
# stages), so `requirements` must be named beside `build`.
#
# usage: deploy/images/build.sh [TARGET...]      (env: SYNTHPERF_IMAGE_TAG, default "local";
#                                                  images are tagged synthperf-TARGET:TAG)
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
images_dir=${SYNTHPERF_IMAGES_DIR:-$repo/var/images}
tag=${SYNTHPERF_IMAGE_TAG:-local}
base_tag=localhost/synthperf-base:bookworm
torch_version=$(sed -n 's/^ARG TORCH_VERSION=//p' "$repo/Dockerfile")
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(service worker-cpu)
stages=$(sed -n 's/^FROM .* AS \([A-Za-z0-9_.-]*\)[[:space:]]*$/\1/p' "$repo/Dockerfile")
for t in "${targets[@]}"; do
  if [ "$t" = worker-gpu ]; then
    echo "build.sh: worker-gpu needs the CUDA base image, which cannot be fetched here; build it on a Docker host" >&2
    exit 2
  fi
  if ! grep -qx -- "$t" <<<"$stages"; then
    echo "build.sh: no stage '$t' in the Dockerfile (stages: $(echo $stages))" >&2
    exit 2
  fi
done

bash "$repo/deploy/dev/ensure_image_tools.sh"
mkdir -p "$images_dir"
podman=(podman --root "$images_dir/storage" --runroot "$images_dir/run")

say() { printf '[images %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

# ------------------------------------------------------------------ 1. the local base
debian_mirror() {
  # The first Debian archive URI of this machine's apt sources that serves bookworm (deb822 or
  # one-line format); SYNTHPERF_DEBIAN_MIRROR overrides it.
  if [ -n "${SYNTHPERF_DEBIAN_MIRROR:-}" ]; then echo "$SYNTHPERF_DEBIAN_MIRROR"; return; fi
  local f
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    awk 'BEGIN{RS=""} /Suites:[^\n]*bookworm( |\n|$)/ && /Components:[^\n]*main/ {
           if (match($0, /URIs:[ \t]*[^ \t\n]+/)) { split(substr($0, RSTART, RLENGTH), a, /[ \t]+/); print a[2]; exit } }' "$f"
  done
  { cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null || true; } \
    | awk '$1=="deb" && $3=="bookworm" {for(i=4;i<=NF;i++) if($i=="main"){print $2; exit}}'
}
rootfs_tar="$images_dir/debian-bookworm-minbase.tar"
if [ ! -s "$rootfs_tar" ]; then
  mirror=$({ debian_mirror || true; } | head -n1)
  if [ -z "$mirror" ]; then
    echo "build.sh: no Debian bookworm archive in the apt sources; set SYNTHPERF_DEBIAN_MIRROR" >&2
    exit 2
  fi
  say "debootstrap --variant=minbase bookworm from $mirror"
  work=$(mktemp -d "$images_dir/rootfs.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  debootstrap --variant=minbase bookworm "$work/rootfs" "$mirror" >"$images_dir/debootstrap.log" 2>&1 \
    || { tail -n 20 "$images_dir/debootstrap.log" >&2; exit 1; }
  # what a base image does not carry: downloaded packages, package lists, logs
  rm -rf "$work/rootfs/var/cache/apt/archives/"*.deb "$work/rootfs/var/cache/apt/"*.bin "$work/rootfs/var/lib/apt/lists/"*
  find "$work/rootfs/var/log" -type f -delete
  tar --numeric-owner -C "$work/rootfs" -cf "$work/rootfs.tar" .
  mv "$work/rootfs.tar" "$rootfs_tar"
  rm -rf "$work"
  trap - EXIT
  "${podman[@]}" rmi -f "$base_tag" >/dev/null 2>&1 || true
fi
if ! "${podman[@]}" image exists "$base_tag"; then
  say "podman import $rootfs_tar as $base_tag"
  "${podman[@]}" import --change 'CMD ["/bin/bash"]' "$rootfs_tar" "$base_tag" >/dev/null
fi

# ------------------------------------------------------------------ 2. the targets
build_args=(--build-arg "BASE_IMAGE=$base_tag")
volumes=()
# torch: a local folder of wheels holding the CPU wheel of the pinned release, when this machine has
# one (SYNTHPERF_TORCH_WHEELS, else pip's find-links); otherwise the Dockerfile's default index.
wheel_dirs=("${SYNTHPERF_TORCH_WHEELS:-}")
for d in ${PIP_FIND_LINKS:-} $(pip config get global.find-links 2>/dev/null || true); do wheel_dirs+=("$d"); done
for d in "${wheel_dirs[@]}"; do
  [ -n "$d" ] && [ -d "$d" ] || continue
  if compgen -G "$d/torch-${torch_version}+cpu-*.whl" >/dev/null; then
    volumes+=(--volume "$d:/run/torch-wheels:ro")
    build_args+=(--build-arg "TORCH_PIP_ARGS=--no-index --find-links /run/torch-wheels")
    say "torch $torch_version from $d"
    break
  fi
done
# A TLS-intercepting proxy's CA, if this machine trusts one: the build's pip uses the host's bundle
# (mounted for the RUN steps only; no image layer holds it).
if [ -s /etc/ssl/certs/ca-certificates.crt ]; then
  volumes+=(--volume /etc/ssl/certs/ca-certificates.crt:/run/host-ca.crt:ro)
  build_args+=(--build-arg PIP_CERT=/run/host-ca.crt)
fi
for t in "${targets[@]}"; do
  say "podman build --target $t -t synthperf-$t:$tag"
  start=$SECONDS
  "${podman[@]}" build --isolation=chroot --format docker --layers \
    "${build_args[@]}" "${volumes[@]}" \
    --target "$t" -t "synthperf-$t:$tag" -f "$repo/Dockerfile" "$repo"
  size=$("${podman[@]}" image inspect --format '{{.Size}}' "synthperf-$t:$tag")
  say "built synthperf-$t:$tag in $((SECONDS - start)) s, $((size / 1000000)) MB"
done
