#!/usr/bin/env bash
# CI check of the docker-compose demo cluster (deploy/).
#
# Always: validate deploy/docker-compose.yml, alone and with the TLS overlay, with
#   `docker-compose config -q` and with the Compose Specification JSON schema (check-jsonschema).
# Then, unless MOS_DOCKER=0: start a private Docker engine, build the image offline
#   (deploy/build_offline.sh), run the cluster (server + alice + bob), and check that the server and
#   both clients hold a byte-identical fused adapter.safetensors. The engine is stopped and the host
#   left as it was on exit, success or not.
#
# Environment:
#   MOS_DOCKER=0            validation only (for machines that cannot run dockerd)
#   MOS_DOCKER_TLS=1        run the cluster with deploy/docker-compose.tls.yml on top
#   MOS_DOCKER_TIMEOUT=S    how long the cluster may run, seconds (default 600)
#   MOS_DOCKER_ROOT=DIR     the private engine's data-root, kept between runs as the image and
#                           build cache (default /var/lib/mos-docker)
#   MOS_DOCKER_KEEP_OUT=1   keep the cluster's output folder (its path is printed)
#   MOS_CLIENT_ARGS         extra mos-client arguments (default here "--steps 4": a short tuning,
#                           as the tests use; set it empty for the full default tuning)
#   MOS_SERVER_ARGS         extra mos-server arguments (default none)
#   OMP_NUM_THREADS         threads per party (default here 1: three parties share the cores)
#
# Networking, as checked on Debian 12 with docker.io 20.10.24 and docker-compose 1.29.2:
#   dockerd runs with --iptables=false --ip-forward=false --bridge=none, so it changes neither the
#   host's iptables/nftables rules nor net.ipv4.ip_forward, and creates no docker0. The compose
#   network (a user-defined bridge, `internal: true`) still works: the containers reach each other
#   by service name (the engine's embedded DNS at 127.0.0.11 answers; its redirect rules live in
#   each container's own network namespace) over plain L2 on the bridge. Checked both with and
#   without `internal: true`. What the containers cannot do is reach anything outside the host,
#   which the demo never needs. Caveat: with br_netfilter loaded (bridge-nf-call-iptables=1, as
#   here) bridged frames pass the host's FORWARD chain; its policy is ACCEPT here. A host whose
#   FORWARD policy is DROP (e.g. one where a system Docker once ran) would block them.
#   The bridge (br-*) and veth links go away with `docker-compose down`; cleanup removes any left.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

MOS_DOCKER="${MOS_DOCKER:-1}"
MOS_DOCKER_TLS="${MOS_DOCKER_TLS:-0}"
MOS_DOCKER_TIMEOUT="${MOS_DOCKER_TIMEOUT:-600}"
MOS_DOCKER_ROOT="${MOS_DOCKER_ROOT:-/var/lib/mos-docker}"
base_yml=deploy/docker-compose.yml
tls_yml=deploy/docker-compose.tls.yml
project=mosci
t_start=$SECONDS
# Turn signals into a plain exit, so that the EXIT trap (cleanup) runs for them too.
trap 'exit 130' INT
trap 'exit 143' TERM

log() { printf '[ci_docker +%4ss] %s\n' "$((SECONDS - t_start))" "$*" >&2; }
fail() { log "FAIL: $*"; exit 1; }
is_root() { [[ $(id -u) == 0 ]]; }

apt_updated=0
apt_install() {  # apt_install PKG... (root only; `apt-get update` once per run)
  if [[ $apt_updated == 0 ]]; then
    log "apt-get update"
    apt-get update -qq >/dev/null || fail "apt-get update failed"
    apt_updated=1
  fi
  log "apt-get install $*"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null \
    || fail "apt-get install $* failed"
}

# ======================================================================== 1. validation
if ! command -v docker-compose >/dev/null 2>&1; then
  if is_root && command -v apt-get >/dev/null 2>&1; then apt_install docker-compose; fi
fi
if command -v docker-compose >/dev/null 2>&1; then
  log "docker-compose config -q: $base_yml"
  docker-compose -f "$base_yml" config -q || fail "$base_yml does not validate"
  log "docker-compose config -q: $base_yml + $tls_yml"
  docker-compose -f "$base_yml" -f "$tls_yml" config -q || fail "$base_yml + $tls_yml do not validate"
else
  log "WARNING: docker-compose not available (and cannot be installed here): its config check skipped"
fi

tmp_venv=""
cleanup_validation() { [[ -n "$tmp_venv" ]] && rm -rf "$tmp_venv"; return 0; }
trap cleanup_validation EXIT
if command -v check-jsonschema >/dev/null 2>&1; then
  cjs=check-jsonschema
else
  tmp_venv="$(mktemp -d "${TMPDIR:-/tmp}/mos-cjs.XXXXXX")"
  log "installing check-jsonschema into a throwaway venv"
  python3 -m venv "$tmp_venv" || fail "python3 -m venv failed"
  "$tmp_venv/bin/pip" install -q --disable-pip-version-check check-jsonschema >/dev/null 2>&1 \
    || fail "pip install check-jsonschema failed"
  cjs="$tmp_venv/bin/check-jsonschema"
fi
log "check-jsonschema --builtin-schema vendor.compose-spec"
"$cjs" --builtin-schema vendor.compose-spec "$base_yml" "$tls_yml" || fail "compose-spec schema check failed"
cleanup_validation; tmp_venv=""

if [[ "$MOS_DOCKER" == 0 ]]; then
  log "MOS_DOCKER=0: validation only, the real cluster run is not attempted"
  exit 0
fi
if ! is_root; then
  log "SKIPPED the real cluster run: not root (uid $(id -u)); a private dockerd needs root."
  log "validation passed; run as root, or set MOS_DOCKER=0 to make validation-only explicit"
  exit 0
fi

# ======================================================================== 2. a private engine
need=()
command -v dockerd >/dev/null 2>&1 || need+=(docker.io)
command -v docker-compose >/dev/null 2>&1 || need+=(docker-compose)
command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
if ((${#need[@]})); then
  command -v apt-get >/dev/null 2>&1 || fail "missing ${need[*]} and no apt-get to install them"
  apt_install "${need[@]}"
fi
# The CLI that comes with docker.io matches its dockerd (20.10); a newer `docker` earlier on PATH
# also works (it negotiates the API version down), but the legacy builder is plainer with the old one.
if [[ -x /usr/bin/docker ]]; then DOCKER=/usr/bin/docker; else DOCKER="$(command -v docker)"; fi
export DOCKER

run_dir="$(mktemp -d /run/mos-dockerd.XXXXXX 2>/dev/null || mktemp -d /tmp/mos-dockerd.XXXXXX)"
sock="$run_dir/docker.sock"
export DOCKER_HOST="unix://$sock"
pidfile=/run/mos-dockerd.pid     # fixed: dockerd refuses to start while another one holds it
dockerd_pid=""
out_dir=""
compose_up=0
# What dockerd/containerd make outside their data-root and exec-root whatever the flags say:
# empty folders in /run (plugin discovery, shim sockets) and, with dockerd 20.10, a trust key
# /etc/docker/key.json. Removed again at the end where they were not there before.
key_existed=0; [[ -e /etc/docker/key.json ]] && key_existed=1
run_leftovers=()
for d in /run/docker/plugins /run/docker /run/containerd/s /run/containerd /etc/docker; do
  [[ -e "$d" ]] || run_leftovers+=("$d")
done
links_before="$(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1 | sort || true)"

compose() {
  local files=(-f "$base_yml")
  [[ "$MOS_DOCKER_TLS" == 1 ]] && files+=(-f "$tls_yml")
  docker-compose -p "$project" "${files[@]}" "$@"
}

cleanup() {
  local rc=$?
  set +e
  if [[ $compose_up == 1 ]]; then
    log "docker-compose down -v"
    timeout 90 docker-compose -p "$project" -f "$base_yml" -f "$tls_yml" down -v --remove-orphans -t 5 >/dev/null 2>&1
  fi
  if [[ -n "$dockerd_pid" ]] && kill -0 "$dockerd_pid" 2>/dev/null; then
    local cpid=""
    cpid="$(cat "$run_dir/exec/containerd/containerd.pid" 2>/dev/null)"
    log "stopping dockerd (pid $dockerd_pid)"
    kill -TERM "$dockerd_pid" 2>/dev/null
    for _ in $(seq 60); do kill -0 "$dockerd_pid" 2>/dev/null || break; sleep 0.5; done
    if kill -0 "$dockerd_pid" 2>/dev/null; then
      log "dockerd did not stop in 30s: SIGKILL"
      kill -KILL "$dockerd_pid" 2>/dev/null
    fi
    wait "$dockerd_pid" 2>/dev/null
    # dockerd stops the containerd it started; make sure, by that containerd's own pid.
    if [[ -n "$cpid" ]] && kill -0 "$cpid" 2>/dev/null \
       && grep -q "$run_dir" "/proc/$cpid/cmdline" 2>/dev/null; then
      kill -TERM "$cpid" 2>/dev/null; sleep 2; kill -KILL "$cpid" 2>/dev/null
    fi
  fi
  # Links the engine made and left behind (only after a crash: `down` removes them).
  local l
  for l in $(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1 | sort); do
    case "$l" in br-*|veth*) grep -qx "$l" <<<"$links_before" || ip link delete "$l" 2>/dev/null ;; esac
  done
  # Mounts left below our run dir or the data-root (only after a crash).
  local m
  for m in $(awk -v a="$run_dir/" -v b="$MOS_DOCKER_ROOT/" 'index($2, a) == 1 || index($2, b) == 1 {print $2}' /proc/mounts | sort -r); do
    umount -l "$m" 2>/dev/null
  done
  rm -rf --one-file-system "$run_dir"
  rm -f "$pidfile"
  [[ $key_existed == 0 ]] && rm -f /etc/docker/key.json
  local d
  for d in "${run_leftovers[@]}"; do rmdir "$d" 2>/dev/null; done
  if [[ -n "$out_dir" ]]; then
    if [[ "${MOS_DOCKER_KEEP_OUT:-0}" == 1 ]]; then log "outputs kept in $out_dir"; else rm -rf "$out_dir"; fi
  fi
  if [[ $rc == 0 ]]; then log "PASS (${SECONDS}s)"; else log "FAILED (exit $rc, ${SECONDS}s)"; fi
  exit "$rc"
}
trap cleanup EXIT

log "starting a private dockerd (data-root $MOS_DOCKER_ROOT, socket $sock)"
mkdir -p "$MOS_DOCKER_ROOT"
# Its own (empty) config file, so that a host's /etc/docker/daemon.json plays no part.
echo '{}' >"$run_dir/daemon.json"
dockerd --config-file "$run_dir/daemon.json" \
  --iptables=false --ip-forward=false --bridge=none \
  --data-root "$MOS_DOCKER_ROOT" --exec-root "$run_dir/exec" \
  -H "$DOCKER_HOST" --pidfile "$pidfile" >"$run_dir/dockerd.log" 2>&1 &
dockerd_pid=$!
for _ in $(seq 120); do
  "$DOCKER" version >/dev/null 2>&1 && break
  if ! kill -0 "$dockerd_pid" 2>/dev/null; then
    tail -40 "$run_dir/dockerd.log" >&2
    dockerd_pid=""
    fail "dockerd exited at start (log above)"
  fi
  sleep 0.5
done
"$DOCKER" version >/dev/null 2>&1 || { tail -40 "$run_dir/dockerd.log" >&2; fail "dockerd did not answer in 60s"; }
log "dockerd $("$DOCKER" version --format '{{.Server.Version}}') up (pid $dockerd_pid)"

# ======================================================================== 3. image
log "building the image: deploy/build_offline.sh"
deploy/build_offline.sh || fail "deploy/build_offline.sh failed"

# ======================================================================== 4. the cluster
for who in alice bob; do
  [[ -d "data/$who" ]] && [[ -n "$(ls -A "data/$who" 2>/dev/null)" ]] \
    || fail "data/$who is missing or empty: the clients mount it as their concept folder"
done
out_dir="$(mktemp -d /var/tmp/mos-ci-out.XXXXXX)"
export MOS_OUT_DIR="$out_dir"
export MOS_CLIENT_ARGS="${MOS_CLIENT_ARGS---steps 4}"
export MOS_SERVER_ARGS="${MOS_SERVER_ARGS-}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
mkdir -p "$out_dir"/{server,server-state,alice,bob}

show_logs() { compose logs --no-color --timestamps 2>&1 | sed 's/^/  | /' >&2 || true; }

log "docker-compose up -d (outputs in $out_dir, TLS=$MOS_DOCKER_TLS, client args '$MOS_CLIENT_ARGS')"
compose_up=1
compose up -d --no-build || { show_logs; fail "docker-compose up failed"; }

declare -A cid=()
for svc in server alice bob; do
  cid[$svc]="$(compose ps -q "$svc" 2>/dev/null | head -1)"
  [[ -n "${cid[$svc]}" ]] || { show_logs; fail "no container for $svc after up"; }
done
state() {  # state SERVICE -> "<status> <exit code>" of its container
  "$DOCKER" inspect -f '{{.State.Status}} {{.State.ExitCode}}' "${cid[$1]}" 2>/dev/null || echo "absent -1"
}

deadline=$((SECONDS + MOS_DOCKER_TIMEOUT))
last=""
while :; do
  all_exited=1; summary=""; early=""
  for svc in server alice bob; do
    read -r st code <<<"$(state "$svc")"
    summary+="$svc=$st"; [[ "$st" == exited ]] && summary+="($code)"; summary+=" "
    [[ "$st" == exited ]] || all_exited=0
    [[ "$st" == exited && "$code" != 0 ]] && early+="$svc "
  done
  [[ "$summary" != "$last" ]] && { log "$summary"; last="$summary"; }
  [[ $all_exited == 1 ]] && break
  if [[ -n "$early" ]]; then
    show_logs; fail "exited non-zero: $early"
  fi
  if ((SECONDS > deadline)); then
    show_logs; fail "the cluster did not finish in ${MOS_DOCKER_TIMEOUT}s ($summary)"
  fi
  sleep 3
done

bad=""
for svc in server alice bob; do
  read -r st code <<<"$(state "$svc")"
  [[ "$code" == 0 ]] || bad+="$svc($code) "
done
[[ -z "$bad" ]] || { show_logs; fail "non-zero exit: $bad"; }

# ======================================================================== 5. the fused adapters
# The server writes OUT/round-N/adapter.safetensors (one folder per round; the last counts), each
# client OUT/adapter.safetensors.
pick() {  # pick DIR: DIR/adapter.safetensors, else the last round's (DIR/round-N/...)
  if [[ -f "$1/adapter.safetensors" ]]; then echo "$1/adapter.safetensors"; return; fi
  find "$1" -path '*round-*/adapter.safetensors' -type f 2>/dev/null | sort -V | tail -1
}
declare -A sha=()
for who in server alice bob; do
  f="$(pick "$out_dir/$who")"
  if [[ -z "$f" ]]; then
    find "$out_dir" -maxdepth 3 >&2
    show_logs; fail "no adapter.safetensors in the $who output"
  fi
  sha[$who]="$(sha256sum "$f" | cut -d' ' -f1)"
  log "$(printf '%-6s %s  %s (%s bytes)' "$who" "${sha[$who]}" "${f#"$out_dir"/}" "$(stat -c %s "$f")")"
done
if [[ "$(printf '%s\n' "${sha[@]}" | sort -u | wc -l)" != 1 ]]; then
  show_logs; fail "the fused adapters differ"
fi
log "server, alice and bob hold the same fused adapter"
compose logs --no-color --tail 5 2>&1 | sed 's/^/  | /' >&2 || true
exit 0
