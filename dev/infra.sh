#!/bin/bash
# Test infrastructure for imgbuild: a private Docker engine, a loopback registry, base images.
#
# usage: dev/infra.sh up | down | env
#
#   up    Install the Debian packages this needs, start dockerd and docker-registry on
#         loopback, build the base images the tests pull from Debian packages with
#         `imgbuild base build` (imgbuild's own assembly: no daemon, no mmdebstrap), push
#         them into the registry and write /run/imgbuild-infra/env. Safe to run again:
#         what is already running or already pushed is left alone.
#   down  Stop what `up` started. Caches, the engine's data and the registry's storage stay.
#   env   Print the env file that `up` wrote (shell `export` lines).
#
# Nothing here binds or talks to anything but 127.0.0.1 and the Debian archive: the
# engine runs with --bridge=none --iptables=false and its own root, exec root, pidfile and
# socket, so it never meets another engine on the machine.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
readonly HERE
readonly STATE=/var/lib/imgbuild-infra
readonly RUN=/run/imgbuild-infra
readonly CACHE=/var/cache/imgbuild-infra
readonly LOGS=$STATE/logs
readonly SOCK=$RUN/docker.sock
readonly ENGINE=unix://$SOCK
# A second engine that cannot see this host's /tmp (it runs in a mount namespace of its
# own with an empty tmpfs there), as an engine on another machine or in Docker-in-Docker
# cannot: tests build through it to show no host path is ever bind-mounted.
readonly REMOTE_SOCK=$RUN/remote-docker.sock
readonly REMOTE_ENGINE=unix://$REMOTE_SOCK
readonly REGISTRY=127.0.0.1:5055
# /usr/local/bin/docker, first on PATH, is a newer client that wants a buildx plugin;
# the engine's own 20.10 client lives here.
readonly DOCKER=/usr/bin/docker
ROOT=$(cd "$HERE/.." && pwd)
readonly ROOT

# docker.io and docker-registry as asked; gpgv and the archive keyring verify the Debian
# archive's signatures when imgbuild builds the bases; curl for the readiness probes; tmux
# gives the progress test a real terminal; openssl makes the registry tests' CA,
# certificates and token signatures (tests/fixtures/pki.py).
readonly PACKAGES=(
    docker.io docker-registry gpgv debian-archive-keyring ca-certificates curl python3 tmux
    openssl
)

# ref in the registry | what imgbuild base build makes (catalog flavor or file) | python |
# platforms
#
# The tests pull these through IMGBUILD_REGISTRY_MIRRORS in place of gcr.io's distroless
# and Docker Hub's python:slim, which this machine cannot reach: imgbuild's own debian base
# (Debian's CPython, libstdc++, libgomp, CA certificates, tzdata, netbase, no shell) and a
# slim stand-in with a shell and /usr/local/bin/python3.11 (dev/infra/python-slim.toml).
readonly IMAGES=(
    "distroless/python3-debian12:latest|debian|3.11|linux/amd64"
    "library/python:3.11-slim-bookworm|$HERE/infra/python-slim.toml|3.11|linux/amd64"
    "distroless/python3-debian13:latest|debian|3.13|linux/amd64"
    "imgbuild-test/python3-multi:latest|debian|3.11|linux/amd64,linux/arm64"
)
# Bump when the way images are made here changes, so they are pushed again.
readonly RECIPE=2

# Loopback traffic must never go through a proxy that happens to be in the environment.
export NO_PROXY=127.0.0.1,localhost no_proxy=127.0.0.1,localhost

log() { printf 'infra: %s\n' "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

dk() { DOCKER_CONFIG=$STATE/docker-cli "$DOCKER" -H "$ENGINE" "$@"; }

# --- processes ------------------------------------------------------------------------

# Print the pid in PIDFILE if that process is alive and its command line contains NEEDLE.
pid_from() {
    local pidfile=$1 needle=$2 pid
    pid=$(cat "$pidfile" 2>/dev/null) || return 1
    [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$needle" || return 1
    echo "$pid"
}

# TERM, wait up to SECONDS, then KILL.
stop_pid() {
    local pid=$1 what=$2 seconds=$3 i
    kill -TERM "$pid" 2>/dev/null || return 0
    for ((i = 0; i < seconds * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    log "$what (pid $pid) ignored TERM for ${seconds}s; killing"
    kill -KILL "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
}

registry_answers() { curl -fsS --noproxy '*' -o /dev/null --max-time 2 "http://$REGISTRY/v2/" 2>/dev/null; }

# --- up: packages -----------------------------------------------------------------------

install_packages() {
    local missing=() pkg
    for pkg in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' ||
            missing+=("$pkg")
    done
    # Older bookworm keyrings lack the trixie keys that the debian13 image needs.
    if [[ ! -e /usr/share/keyrings/debian-archive-trixie-stable.gpg ]]; then
        missing+=(debian-archive-keyring)
    fi
    if ((${#missing[@]} == 0)); then
        log "packages: all present"
        return
    fi
    log "packages: installing ${missing[*]}"
    # docker.io's and docker-registry's maintainer scripts would start system services
    # (a dockerd with a bridge and iptables rules); policy-rc.d 101 forbids that.
    local policy=/usr/sbin/policy-rc.d added_policy=0 rc=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 0755 "$policy"
        added_policy=1
    fi
    {
        apt-get update -q &&
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
    } >>"$LOGS/apt.log" 2>&1 || rc=$?
    ((added_policy)) && rm -f "$policy"
    if ((rc != 0)); then
        tail -n 20 "$LOGS/apt.log" >&2
        die "apt-get failed (exit $rc); full log in $LOGS/apt.log"
    fi
}

# --- up: engine and registry ------------------------------------------------------------

engine_answers_on() { DOCKER_CONFIG=$STATE/docker-cli "$DOCKER" -H "$1" version --format '{{.Server.Version}}' >/dev/null 2>&1; }

# start_dockerd NAME SOCKET [WRAPPER...]: a dockerd with its own data root, exec root,
# pidfile, socket and containerd namespace, all named after NAME; WRAPPER runs it.
start_dockerd() {
    local name=$1 sock=$2
    shift 2
    if engine_answers_on "unix://$sock"; then
        log "$name: already answering on $sock"
        return
    fi
    local pid
    if ! pid=$(pid_from "$RUN/$name.pid" "$sock"); then
        log "$name: starting (data root $STATE/$name)"
        mkdir -p "$STATE/$name" "$RUN/$name" "$STATE/docker-cli"
        # setsid: the daemon must outlive this script and its caller's process group.
        # 9>&-: it must not inherit the lock, or the next `down` would wait on it forever.
        setsid "$@" dockerd \
            --data-root "$STATE/$name" \
            --exec-root "$RUN/$name" \
            --pidfile "$RUN/$name.pid" \
            -H "unix://$sock" \
            --bridge=none --iptables=false --ip-forward=false --ip-masq=false \
            --userland-proxy=false \
            --containerd-namespace="imgbuild-infra-$name" \
            --containerd-plugins-namespace="imgbuild-infra-$name-plugins" \
            >>"$LOGS/$name.log" 2>&1 </dev/null 9>&- &
        pid=$!
    fi
    local i
    for ((i = 0; i < 600; i++)); do
        engine_answers_on "unix://$sock" && {
            log "$name: up (pid $pid)"
            return
        }
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    tail -n 20 "$LOGS/$name.log" >&2
    die "$name did not answer on $sock; log in $LOGS/$name.log"
}

# stop_dockerd NAME SOCKET
stop_dockerd() {
    local name=$1 sock=$2 pid
    if pid=$(pid_from "$RUN/$name.pid" "$sock"); then
        log "$name: stopping (pid $pid)"
        stop_pid "$pid" "$name" 60
    fi
    # dockerd stops the containerd it supervises; if it was killed, do it ourselves.
    if pid=$(pid_from "$RUN/$name/containerd/containerd.pid" "$RUN/$name"); then
        log "$name containerd: stopping (pid $pid)"
        stop_pid "$pid" containerd 20
    fi
    rm -f "$RUN/$name.pid" "$sock"
}

start_engines() {
    start_dockerd docker "$SOCK"
    # `unshare` gives the engine a private mount table; the tmpfs hides the host's /tmp.
    start_dockerd remote-docker "$REMOTE_SOCK" \
        unshare --mount --propagation private -- \
        sh -c 'mount -t tmpfs -o size=256m,mode=1777 imgbuild-remote-tmp /tmp && exec "$@"' sh
}

start_registry() {
    local pid
    if pid=$(pid_from "$RUN/registry.pid" docker-registry) && registry_answers; then
        log "registry: already answering on $REGISTRY"
        return
    fi
    if [[ -z ${pid:-} ]] && registry_answers; then
        die "something else answers on $REGISTRY; stop it or run 'dev/infra.sh down' first"
    fi
    if [[ -z ${pid:-} ]]; then
        log "registry: starting on $REGISTRY (storage $STATE/registry)"
        mkdir -p "$STATE/registry"
        cp "$HERE/infra/registry.yml" "$RUN/registry.yml"
        # Blobs no manifest names any more (the benchmark deletes the manifests it pushed)
        # are freed here, while the registry is stopped: collected under a running one, its
        # blob cache still named them. Untagged manifests stay (a multi-platform base's
        # children are untagged).
        docker-registry garbage-collect "$RUN/registry.yml" >>"$LOGS/registry.log" 2>&1 ||
            log "registry: garbage-collect failed (log in $LOGS/registry.log); starting anyway"
        setsid docker-registry serve "$RUN/registry.yml" >>"$LOGS/registry.log" 2>&1 </dev/null 9>&- &
        pid=$!
        echo "$pid" >"$RUN/registry.pid"
    fi
    local i
    for ((i = 0; i < 300; i++)); do
        registry_answers && {
            log "registry: up (pid $pid)"
            return
        }
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    tail -n 20 "$LOGS/registry.log" >&2
    die "docker-registry did not answer on http://$REGISTRY/v2/; log in $LOGS/registry.log"
}

# --- up: base images --------------------------------------------------------------------

# Print "URI SUITE" for every enabled deb source in the machine's apt configuration.
apt_sources() {
    local f
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [[ -f $f ]] || continue
        awk '$1 == "deb" { i = 2; if ($2 ~ /^\[/) { while ($i !~ /\]$/) i++; i++ } print $i, $(i + 1) }' "$f"
    done
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -f $f ]] || continue
        awk '
            function flush() {
                if (types ~ /(^| )deb( |$)/ && enabled != "no")
                    for (u = 1; u <= nu; u++) for (s = 1; s <= ns; s++) print uris[u], suites[s]
                types = ""; enabled = ""; nu = 0; ns = 0
            }
            /^[ \t]*#/ { next }
            /^[ \t]*$/ { flush(); next }
            tolower($1) == "types:" { $1 = ""; types = $0 }
            tolower($1) == "enabled:" { enabled = tolower($2) }
            tolower($1) == "uris:" { for (i = 2; i <= NF; i++) uris[++nu] = $i }
            tolower($1) == "suites:" { for (i = 2; i <= NF; i++) suites[++ns] = $i }
            END { flush() }
        ' "$f"
    done
}

# Set MIRROR and SECURITY_MIRROR from the machine's apt sources, so imgbuild fetches
# from the same archive that apt-get uses here.
find_mirrors() {
    local codename sources
    # shellcheck source=/dev/null
    codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
    sources=$(apt_sources)
    MIRROR=$(awk -v s="$codename" '$2 == s { print $1; exit }' <<<"$sources")
    SECURITY_MIRROR=$(awk -v s="$codename-security" '$2 == s { print $1; exit }' <<<"$sources")
    MIRROR=${MIRROR:-http://deb.debian.org/debian}
    SECURITY_MIRROR=${SECURITY_MIRROR:-http://deb.debian.org/debian-security}
    log "apt mirror: $MIRROR (security: $SECURITY_MIRROR)"
}

# Print the registry's digest for NAME:TAG, or nothing when it has no such manifest.
# An extra media type (an index's) may be accepted too.
registry_digest() {
    local name=$1 tag=$2 extra=${3:-application/vnd.oci.image.manifest.v1+json}
    curl -fsS --noproxy '*' -I --max-time 10 \
        -H 'Accept: application/vnd.docker.distribution.manifest.v2+json' \
        -H 'Accept: application/vnd.oci.image.manifest.v1+json' \
        -H "Accept: $extra" \
        "http://$REGISTRY/v2/$name/manifests/$tag" 2>/dev/null |
        awk 'tolower($1) == "docker-content-digest:" { sub(/\r$/, "", $2); print $2 }' || true
}

# What an image is made from: this recipe, its definition, and imgbuild's assembly code.
image_key() {
    local definition=$1 python=$2 platforms=$3 file=$1
    [[ $definition == *.toml ]] || file=$ROOT/base-images/$definition.toml
    {
        printf '%s\n' "$RECIPE" "$definition" "$python" "$platforms" "$MIRROR" "$SECURITY_MIRROR"
        cat "$file" "$ROOT"/imagebuild/debian/*.py
    } | sha256sum | cut -c1-16
}

# Build REF with `imgbuild base build` and push it, unless the registry still holds what
# was pushed from the same key; then smoke-test it as nonroot in the engine.
ensure_image() {
    local ref definition python platforms
    IFS='|' read -r ref definition python platforms <<<"$1"
    local name=${ref%:*} tag=${ref##*:} key digest
    local marker=$STATE/pushed/${ref//[\/:]/_}
    local index=application/vnd.oci.image.index.v1+json
    key=$(image_key "$definition" "$python" "$platforms")
    digest=$(registry_digest "$name" "$tag" "$index")
    # A test that overwrote or deleted the tag gets it back.
    if [[ -n $digest && -f $marker && $(<"$marker") == "$key $digest" ]]; then
        log "image: $REGISTRY/$ref present ($digest)"
        return
    fi
    log "build: $REGISTRY/$ref ($definition, Python $python, $platforms)"
    (cd "$ROOT" && uv run --locked --quiet imgbuild base build "$definition" --python "$python" \
        --platform "$platforms" --tag "$REGISTRY/$ref" --push --cache-dir "$CACHE/imgbuild" \
        --debian-mirror "$MIRROR" --debian-security-mirror "$SECURITY_MIRROR" --quiet) \
        >>"$LOGS/build.log" 2>&1 || {
        tail -n 10 "$LOGS/build.log" >&2
        die "imgbuild base build failed for $ref; log in $LOGS/build.log"
    }
    digest=$(registry_digest "$name" "$tag" "$index")
    [[ -n $digest ]] || die "registry has no manifest for $ref after the push"
    smoke_test "$REGISTRY/$ref" "$python"
    mkdir -p "$STATE/pushed"
    echo "$key $digest" >"$marker"
    log "image: $REGISTRY/$ref pushed ($digest)"
}

# Fail here rather than in a test: nonroot must be able to start Python with TLS.
smoke_test() {
    local full=$1 python=$2
    dk pull "$full" >/dev/null || die "cannot pull $full back from the registry"
    dk run --rm --network none --user 65532 --entrypoint "/usr/bin/python$python" "$full" \
        -c 'import ctypes, ssl, json, socket, sqlite3, zoneinfo
ssl.create_default_context(); zoneinfo.ZoneInfo("Europe/Paris")
ctypes.CDLL("libstdc++.so.6"); socket.getservbyname("https")' ||
        die "smoke test failed for $full"
    dk image rm "$full" >/dev/null
}

write_env() {
    cat >"$RUN/env.partial" <<EOF
export IMGBUILD_TEST_DOCKER_HOST=$ENGINE
export IMGBUILD_TEST_REMOTE_DOCKER_HOST=$REMOTE_ENGINE
export IMGBUILD_TEST_REGISTRY=$REGISTRY
export IMGBUILD_REGISTRY_MIRRORS=docker.io=$REGISTRY,gcr.io=$REGISTRY
EOF
    mv "$RUN/env.partial" "$RUN/env"
    log "env: $RUN/env"
}

cmd_up() {
    local started=$SECONDS spec
    install_packages
    start_engines
    start_registry
    find_mirrors
    mkdir -p "$CACHE"
    command -v uv >/dev/null 2>&1 || python3 -m pip install --quiet uv
    for spec in "${IMAGES[@]}"; do
        ensure_image "$spec"
    done
    write_env
    log "up in $((SECONDS - started))s"
}

# --- down -------------------------------------------------------------------------------

unmount_leftovers() {
    local mountpoint
    # Deepest first; mountinfo field 5 is the mount point.
    awk -v a="$STATE" -v b="$RUN" \
        '{ p = $5; if (index(p, a "/") == 1 || p == a || index(p, b "/") == 1 || p == b) print p }' \
        /proc/self/mountinfo | sort -r | while IFS= read -r mountpoint; do
        mountpoint=${mountpoint//\\040/ }
        umount "$mountpoint" 2>/dev/null || umount -l "$mountpoint" 2>/dev/null ||
            log "could not unmount $mountpoint"
    done
}

cmd_down() {
    local pid
    rm -f "$RUN/env"
    if pid=$(pid_from "$RUN/registry.pid" docker-registry); then
        log "registry: stopping (pid $pid)"
        stop_pid "$pid" docker-registry 10
    fi
    rm -f "$RUN/registry.pid"
    stop_dockerd remote-docker "$REMOTE_SOCK"
    stop_dockerd docker "$SOCK"
    unmount_leftovers
    log "down"
}

cmd_env() {
    [[ -f $RUN/env ]] || die "infrastructure is not up; run 'dev/infra.sh up'"
    cat "$RUN/env"
}

main() {
    local cmd=${1:-}
    case $cmd in
    up | down) ;;
    env)
        cmd_env
        return
        ;;
    *)
        echo "usage: $0 up | down | env" >&2
        exit 2
        ;;
    esac
    ((EUID == 0)) || die "must run as root (installs packages, runs dockerd)"
    mkdir -p "$RUN" "$STATE" "$LOGS"
    # One `up` or `down` at a time on this machine.
    exec 9>"$RUN/lock"
    flock -w 600 9 || die "another dev/infra.sh has held $RUN/lock for 10 minutes"
    "cmd_$cmd"
}

main "$@"
