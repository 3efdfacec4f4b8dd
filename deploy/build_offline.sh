#!/usr/bin/env bash
# Build the demo image (deploy/Dockerfile) without any container registry.
#
#   1. Base image: if "$BASE_IMAGE" (default python:3.11-slim) is not in the engine, make a stand-in
#      of that name from Debian bookworm with debootstrap (its python3 is 3.11) and `docker import`
#      it. The rootfs tarball is cached ($MOS_CACHE_DIR, default /var/cache/mos-docker), so a fresh
#      engine re-imports it in seconds. Where debootstrap cannot run (not root, not Debian) it
#      falls back to `docker pull`, which needs a registry.
#   2. Wheels: the dependencies (CPU torch 2.13.0 plus everything pyproject.toml asks for) are
#      built/downloaded with the host's pip into deploy/.context/wheels, and kept (there and in
#      $MOS_CACHE_DIR/wheels, for fresh checkouts) while the dependency list in pyproject.toml is
#      unchanged. The project's own wheel is rebuilt every run
#      into deploy/.context/project (it changes with every edit; a few seconds).
#   3. `docker build --network none` with BuildKit and deploy/ as the context.
#
# Environment:
#   DOCKER_HOST     engine to talk to (taken as is)
#   DOCKER          docker CLI to use (default: docker on PATH)
#   MOS_IMAGE       tag to build (default mos-federated:latest)
#   BASE_IMAGE      base image (default python:3.11-slim)
#   TORCH_SPEC      torch requirement for the wheels (default torch==2.13.0: on the project's
#                   machines pip resolves it to the CPU wheel; elsewhere set PIP_EXTRA_INDEX_URL to
#                   PyTorch's CPU wheel index, or plain PyPI gives the multi-GB CUDA build)
#   PYTHON          host Python 3.11 used to fetch wheels (default: python3.11, else python3)
#   MOS_CACHE_DIR   where the rootfs tarball and a copy of the wheels are kept
#                   (default /var/cache/mos-docker)
#   MOS_REFRESH_WHEELS=1  rebuild the dependency wheels even when the stamp matches
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
DOCKER="${DOCKER:-docker}"
MOS_IMAGE="${MOS_IMAGE:-mos-federated:latest}"
BASE_IMAGE="${BASE_IMAGE:-python:3.11-slim}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
MOS_CACHE_DIR="${MOS_CACHE_DIR:-/var/cache/mos-docker}"
ctx="$here/.context"

log() { printf '[build_offline %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
t0=$SECONDS

# ---------------------------------------------------------------- host Python 3.11 for the wheels
pick_python() {
  local c
  for c in ${PYTHON:-} python3.11 python3 python; do
    command -v "$c" >/dev/null 2>&1 || continue
    if "$c" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
      echo "$c"; return 0
    fi
  done
  return 1
}
PY="$(pick_python)" || die "need a Python 3.11 on the host (the image's Python) to fetch matching wheels; set PYTHON=/path/to/python3.11"

"$DOCKER" version --format '{{.Server.Version}}' >/dev/null 2>&1 \
  || die "no Docker engine answers (DOCKER_HOST=${DOCKER_HOST:-unset})"

# ---------------------------------------------------------------- 1. the base image
base_from_debootstrap() {
  # Packages for the stand-in base: python3 (3.11 on bookworm) with venv and pip.
  local include="python3,python3-venv,python3-pip,ca-certificates"
  local key tarball rootfs
  key="$(printf 'bookworm minbase %s' "$include" | sha256sum | cut -c1-12)"
  tarball="$MOS_CACHE_DIR/rootfs-bookworm-python3-$key.tar"
  if [[ ! -s "$tarball" ]]; then
    command -v debootstrap >/dev/null 2>&1 || die "debootstrap missing (apt-get install debootstrap)"
    [[ $(id -u) == 0 ]] || die "debootstrap needs root"
    mkdir -p "$MOS_CACHE_DIR"
    rootfs="$(mktemp -d /var/tmp/mos-rootfs.XXXXXX)"
    log "debootstrap bookworm (minbase + $include) into $rootfs"
    # shellcheck disable=SC2064
    trap "umount_under '$rootfs'; rm -rf --one-file-system '$rootfs'" EXIT
    debootstrap --variant=minbase --include="$include" bookworm "$rootfs" >"$rootfs.log" 2>&1 \
      || { tail -30 "$rootfs.log" >&2; die "debootstrap failed (log above)"; }
    rm -f "$rootfs.log"
    umount_under "$rootfs"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
           "$rootfs"/var/log/*.log "$rootfs"/tmp/* 2>/dev/null || true
    tar -C "$rootfs" --numeric-owner --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*' \
        -cf "$tarball.partial" .
    mv "$tarball.partial" "$tarball"
    rm -rf --one-file-system "$rootfs"
    trap - EXIT
  else
    log "using cached rootfs $tarball"
  fi
  log "docker import $tarball as $BASE_IMAGE"
  "$DOCKER" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    "$tarball" "$BASE_IMAGE" >/dev/null
}

umount_under() {  # unmount anything debootstrap left mounted below $1 (deepest first)
  local m
  for m in $(awk -v p="$1/" 'index($2, p) == 1 {print $2}' /proc/mounts | sort -r); do
    umount -l "$m" 2>/dev/null || true
  done
}

if "$DOCKER" image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
  log "base image $BASE_IMAGE present"
elif [[ $(id -u) == 0 ]] && { command -v debootstrap >/dev/null 2>&1 || ls "$MOS_CACHE_DIR"/rootfs-bookworm-python3-*.tar >/dev/null 2>&1; }; then
  base_from_debootstrap
else
  log "base image $BASE_IMAGE absent and debootstrap unusable here: trying docker pull"
  "$DOCKER" pull "$BASE_IMAGE" || die "cannot get base image $BASE_IMAGE"
fi

# ---------------------------------------------------------------- 2. wheels
mkdir -p "$ctx"
wheels="$ctx/wheels"
# The key: the dependency list of pyproject.toml, the torch pin, the Python minor version.
stamp="$("$PY" - "$repo/pyproject.toml" "$TORCH_SPEC" <<'PYEOF'
import hashlib, json, sys, tomllib
proj = tomllib.load(open(sys.argv[1], "rb"))["project"]
key = {"deps": proj.get("dependencies", []), "python": proj.get("requires-python"),
       "torch": sys.argv[2], "py": list(sys.version_info[:2]), "v": 1}
print(hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest())
PYEOF
)"
# A second copy outside the checkout ($MOS_CACHE_DIR/wheels), so that a fresh clone (as CI makes)
# finds them too; hard links where it can. The same files also keep BuildKit's cache of the heavy
# layer valid (a rebuilt openai-clip wheel would differ in its timestamps).
store="$MOS_CACHE_DIR/wheels"
stamp_of() { cat "$1/.stamp" 2>/dev/null || true; }
link_copy() { rm -rf "$2.partial"; cp -al "$1" "$2.partial" 2>/dev/null || { rm -rf "$2.partial"; cp -a "$1" "$2.partial"; }; rm -rf "$2"; mv "$2.partial" "$2"; }
if [[ "${MOS_REFRESH_WHEELS:-0}" != 1 && "$(stamp_of "$wheels")" == "$stamp" ]]; then
  log "dependency wheels up to date ($(ls "$wheels"/*.whl | wc -l) wheels, $(du -sh "$wheels" | cut -f1))"
elif [[ "${MOS_REFRESH_WHEELS:-0}" != 1 && "$(stamp_of "$store")" == "$stamp" ]]; then
  link_copy "$store" "$wheels"
  log "dependency wheels taken from $store ($(ls "$wheels"/*.whl | wc -l) wheels)"
else
  log "fetching dependency wheels with $PY ($TORCH_SPEC)"
  rm -rf "$wheels.partial"; mkdir -p "$wheels.partial"
  "$PY" - "$repo/pyproject.toml" "$TORCH_SPEC" >"$wheels.partial/requirements.txt" <<'PYEOF'
import sys, tomllib
proj = tomllib.load(open(sys.argv[1], "rb"))["project"]
print(sys.argv[2])
for dep in proj.get("dependencies", []):
    print(dep)
PYEOF
  # pip wheel: takes existing wheels as they are and builds the few sdists (openai-clip) into wheels.
  "$PY" -m pip wheel --quiet --disable-pip-version-check --wheel-dir "$wheels.partial" \
        -r "$wheels.partial/requirements.txt" \
    || die "pip wheel failed"
  if ls "$wheels.partial"/nvidia_* >/dev/null 2>&1; then
    log "WARNING: CUDA torch wheels were picked (nvidia_* present); set TORCH_SPEC / PIP_EXTRA_INDEX_URL for CPU torch"
  fi
  echo "$stamp" >"$wheels.partial/.stamp"
  rm -rf "$wheels"; mv "$wheels.partial" "$wheels"
  log "dependency wheels: $(ls "$wheels"/*.whl | wc -l) wheels, $(du -sh "$wheels" | cut -f1)"
  if mkdir -p "$MOS_CACHE_DIR" 2>/dev/null && [[ -w "$MOS_CACHE_DIR" ]]; then
    link_copy "$wheels" "$store" && log "kept a copy in $store"
  fi
fi

log "building the project wheel"
rm -rf "$ctx/project"; mkdir -p "$ctx/project"
"$PY" -m pip wheel --quiet --disable-pip-version-check --no-deps --wheel-dir "$ctx/project" "$repo" \
  || die "building the project wheel failed"
ls "$ctx/project"/*.whl >/dev/null

# ---------------------------------------------------------------- 3. docker build
# BuildKit (the Dockerfile bind-mounts the wheels). A CLI can drive it if it has the buildx plugin
# or is older than 23 (18.09..22.x build with BuildKit natively under DOCKER_BUILDKIT=1). A newer
# CLI without buildx (as /usr/local/bin/docker 28.x here) cannot: then Debian's docker.io CLI
# (/usr/bin/docker, 20.10) is used if present.
can_buildkit() {
  "$1" buildx version >/dev/null 2>&1 && return 0
  local major
  major="$("$1" version --format '{{.Client.Version}}' 2>/dev/null | cut -d. -f1)"
  [[ "$major" =~ ^[0-9]+$ ]] && ((major >= 18 && major < 23))
}
builder=""
for c in "$DOCKER" /usr/bin/docker; do
  if command -v "$c" >/dev/null 2>&1 && can_buildkit "$c"; then builder="$c"; break; fi
done
[[ -n "$builder" ]] || die "no docker CLI here can build with BuildKit: install the buildx plugin (or Debian's docker.io) or point DOCKER at one"

log "docker build -t $MOS_IMAGE (base $BASE_IMAGE, CLI $builder)"
# --network none: nothing in the build reaches out (and the engine may have no default bridge).
DOCKER_BUILDKIT=1 "$builder" build --progress=plain --network none \
  --build-arg "BASE_IMAGE=$BASE_IMAGE" -t "$MOS_IMAGE" -f "$here/Dockerfile" "$here" \
  || die "docker build failed"
# Earlier builds of this image left untagged: drop them (only ours, by the Dockerfile's label);
# BuildKit's cache keeps what later builds reuse.
"$DOCKER" image prune -f --filter "label=org.mix-of-show-federated.image=demo" >/dev/null 2>&1 || true
log "built $MOS_IMAGE in $((SECONDS - t0))s"
