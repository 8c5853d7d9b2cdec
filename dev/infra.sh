#!/bin/bash
# Test infrastructure for imgbuild: a private Docker engine, a loopback registry, base images.
#
# usage: dev/infra.sh up | down | env
#
#   up    Install the Debian packages this needs, start dockerd and docker-registry on
#         loopback, build the base images from Debian packages with mmdebstrap, push them
#         into the registry and write /run/imgbuild-infra/env. Safe to run again: what is
#         already running or already pushed is left alone.
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
readonly CUSTOMIZE=$HERE/infra/customize-rootfs.sh

# docker-registry, mmdebstrap and skopeo as asked; the rest is what mmdebstrap needs
# to build, verify and unshare on a bare machine, and curl for the readiness probes;
# tmux gives the progress test a real terminal; openssl makes the registry tests' CA,
# certificates and token signatures (tests/fixtures/pki.py).
readonly PACKAGES=(
    docker.io docker-registry mmdebstrap skopeo
    arch-test uidmap mount gpg debian-archive-keyring ca-certificates curl python3 tmux
    openssl
)

# ref in the registry | suite | mmdebstrap variant | flavor | python | --include list
#
# Beyond Python, ca-certificates and tzdata, each list carries what the real image has
# and wheels rely on: manylinux wheels link the system libstdc++ (numpy, pandas), which
# distroless/python3 gets from distroless/cc (with libgomp) and python:slim from apt's
# dependencies; netbase gives /etc/services and /etc/protocols; base-files /etc/os-release.
readonly DISTROLESS_EXTRA=ca-certificates,tzdata,netbase,base-files,libstdc++6,libgomp1
readonly IMAGES=(
    "distroless/python3-debian12:latest|bookworm|extract|distroless|3.11|python3.11-minimal,libpython3.11-stdlib,$DISTROLESS_EXTRA"
    "library/python:3.11-slim-bookworm|bookworm|essential|slim|3.11|python3.11-minimal,libpython3.11-stdlib,ca-certificates,tzdata,netbase,libstdc++6"
    "distroless/python3-debian13:latest|trixie|extract|distroless|3.13|python3.13-minimal,libpython3.13-stdlib,$DISTROLESS_EXTRA"
)
# Bump when the way images are assembled changes, so cached tarballs are rebuilt.
readonly RECIPE=1
readonly DEFAULT_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

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

# Set MIRROR and SECURITY_MIRROR from the machine's apt sources, so mmdebstrap fetches
# from the same archive (and through the same proxy) that apt-get uses here.
find_mirrors() {
    local codename sources
    # shellcheck source=/dev/null
    codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
    sources=$(apt_sources)
    MIRROR=$(awk -v s="$codename" '$2 == s { print $1; exit }' <<<"$sources")
    SECURITY_MIRROR=$(awk -v s="$codename-security" '$2 == s { print $1; exit }' <<<"$sources")
    MIRROR=${MIRROR:-http://deb.debian.org/debian}
    SECURITY_MIRROR=${SECURITY_MIRROR:-http://deb.debian.org/debian-security}
    MMDEBSTRAP_APTOPTS=()
    local http_proxy_opt https_proxy_opt
    eval "$(apt-config shell http_proxy_opt Acquire::http::Proxy https_proxy_opt Acquire::https::Proxy)"
    [[ -n ${http_proxy_opt:-} ]] && MMDEBSTRAP_APTOPTS+=("--aptopt=Acquire::http::Proxy \"$http_proxy_opt\"")
    [[ -n ${https_proxy_opt:-} ]] && MMDEBSTRAP_APTOPTS+=("--aptopt=Acquire::https::Proxy \"$https_proxy_opt\"")
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

# build_rootfs SUITE VARIANT FLAVOR PYTHON PACKAGES TARBALL META [ARCH]
build_rootfs() {
    local suite=$1 variant=$2 flavor=$3 python=$4 packages=$5 tarball=$6 meta=$7 arch=${8:-}
    local stem partial=${tarball%.tar}.partial.tar
    stem=$(basename "${tarball%-*}")
    local log=$LOGS/mmdebstrap-$stem.log
    local hook="\"$CUSTOMIZE\" \"\$1\" $flavor $python \"$meta.partial\""
    local args=(--mode=root --format=tar --variant="$variant" --include="$packages" --skip=output/dev)
    # A foreign architecture needs no emulator in the extract variant: nothing is run.
    [[ -n $arch ]] && args+=(--architectures="$arch")
    args+=(${MMDEBSTRAP_APTOPTS[@]+"${MMDEBSTRAP_APTOPTS[@]}"})
    if [[ $variant == extract ]]; then
        # No maintainer scripts run in the extract variant, so the hook goes right after
        # extraction (customize hooks are skipped for this variant).
        args+=(--extract-hook="$hook")
    else
        # Merged /usr via symlinks, as debootstrap does; otherwise usrmerge drags in perl.
        args+=(--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr --customize-hook="$hook")
    fi
    log "mmdebstrap: $suite/$variant ($packages)"
    rm -f "$partial" "$meta.partial"
    if ! mmdebstrap "${args[@]}" "$suite" "$partial" \
        "deb $MIRROR $suite main" \
        "deb $MIRROR $suite-updates main" \
        "deb $SECURITY_MIRROR $suite-security main" >"$log" 2>&1; then
        tail -n 30 "$log" >&2
        rm -f "$partial" "$meta.partial"
        die "mmdebstrap failed for $suite/$flavor; log in $log"
    fi
    mv "$meta.partial" "$meta"
    mv "$partial" "$tarball"
    # Tarballs of older recipes for this image are never read again.
    find "$CACHE" -maxdepth 1 -regextype posix-extended -regex ".*/$stem-[0-9a-f]{16}\.(tar|meta)" \
        ! -name "$(basename "${tarball%.tar}").*" -delete
}

# Import TARBALL as REF into the engine, smoke-test it, push it, drop the local copy.
push_rootfs() {
    local ref=$1 flavor=$2 python=$3 tarball=$4 meta=$5 full=$REGISTRY/$1
    local python_version changes=(--change "ENV PATH=$DEFAULT_PATH" --change "ENV LANG=C.UTF-8")
    python_version=$(sed -n 's/^python_version=//p' "$meta")
    if [[ $flavor == distroless ]]; then
        changes+=(--change "ENTRYPOINT [\"/usr/bin/python$python\"]")
    else
        changes+=(--change "ENV PYTHON_VERSION=$python_version" --change "CMD [\"python$python\"]")
    fi
    log "push: $full (Python $python_version)"
    dk import "${changes[@]}" "$tarball" "$full" >/dev/null
    # Fail here rather than in a test: nonroot must be able to start Python with TLS.
    dk run --rm --network none --user 65532 --entrypoint "/usr/bin/python$python" "$full" \
        -c 'import ctypes, ssl, json, socket, sqlite3, zoneinfo
ssl.create_default_context(); zoneinfo.ZoneInfo("Europe/Paris")
ctypes.CDLL("libstdc++.so.6"); socket.getservbyname("https")' ||
        die "smoke test failed for $full"
    dk push "$full" >>"$LOGS/push.log" 2>&1 || {
        tail -n 10 "$LOGS/push.log" >&2
        die "push failed for $full"
    }
    dk image rm "$full" >/dev/null
}

ensure_image() {
    local ref suite variant flavor python packages
    IFS='|' read -r ref suite variant flavor python packages <<<"$1"
    local name=${ref%:*} tag=${ref##*:} key
    key=$(printf '%s\n' "$RECIPE" "$suite" "$variant" "$flavor" "$python" "$packages" \
        "$(sha256sum <"$CUSTOMIZE")" | sha256sum | cut -c1-16)
    local tarball=$CACHE/$suite-$flavor-$key.tar meta=$CACHE/$suite-$flavor-$key.meta
    local marker=$STATE/pushed/${ref//[\/:]/_} digest
    digest=$(registry_digest "$name" "$tag")
    # Skip only when the registry still holds what we pushed from this recipe; a test
    # that overwrote or deleted the tag gets it back from the cached tarball.
    if [[ -n $digest && -f $marker && $(<"$marker") == "$key $digest" ]]; then
        log "image: $REGISTRY/$ref present ($digest)"
        return
    fi
    if [[ -s $tarball && -s $meta ]]; then
        log "rootfs: cached $tarball"
    else
        build_rootfs "$suite" "$variant" "$flavor" "$python" "$packages" "$tarball" "$meta"
    fi
    push_rootfs "$ref" "$flavor" "$python" "$tarball" "$meta"
    digest=$(registry_digest "$name" "$tag")
    [[ -n $digest ]] || die "registry has no manifest for $ref after the push"
    mkdir -p "$STATE/pushed"
    echo "$key $digest" >"$marker"
    log "image: $REGISTRY/$ref pushed ($digest)"
}

# A two-platform index (linux/amd64, linux/arm64) of the distroless-like bookworm base, for
# multi-platform builds; pushed with skopeo from an OCI layout dev/infra/oci-index.py writes.
readonly MULTI_REF=imgbuild-test/python3-multi:latest
readonly MULTI_ARCHS=(amd64 arm64)
readonly MULTI_PACKAGES=python3.11-minimal,libpython3.11-stdlib,$DISTROLESS_EXTRA

ensure_multiarch_image() {
    local name=${MULTI_REF%:*} tag=${MULTI_REF##*:} arch key keys="" digest pairs=()
    local marker=$STATE/pushed/${MULTI_REF//[\/:]/_}
    for arch in "${MULTI_ARCHS[@]}"; do
        key=$(printf '%s\n' "$RECIPE" bookworm extract distroless 3.11 "$MULTI_PACKAGES" "$arch" \
            "$(sha256sum <"$CUSTOMIZE")" "$(sha256sum <"$HERE/infra/oci-index.py")" |
            sha256sum | cut -c1-16)
        keys+="$key"
        local tarball=$CACHE/multi-bookworm-$arch-$key.tar meta=$CACHE/multi-bookworm-$arch-$key.meta
        if [[ ! -s $tarball || ! -s $meta ]]; then
            build_rootfs bookworm extract distroless 3.11 "$MULTI_PACKAGES" "$tarball" "$meta" "$arch"
        fi
        pairs+=("$arch=$tarball")
    done
    digest=$(registry_digest "$name" "$tag" 'application/vnd.oci.image.index.v1+json')
    if [[ -n $digest && -f $marker && $(<"$marker") == "$keys $digest" ]]; then
        log "image: $REGISTRY/$MULTI_REF present ($digest)"
        return
    fi
    log "push: $REGISTRY/$MULTI_REF (${MULTI_ARCHS[*]})"
    python3 "$HERE/infra/oci-index.py" "$STATE/multi-layout" /usr/bin/python3.11 "${pairs[@]}"
    skopeo copy --quiet --all --dest-tls-verify=false "oci:$STATE/multi-layout:latest" \
        "docker://$REGISTRY/$MULTI_REF" >>"$LOGS/push.log" 2>&1 || {
        tail -n 10 "$LOGS/push.log" >&2
        die "push failed for $MULTI_REF"
    }
    rm -rf "$STATE/multi-layout"
    digest=$(registry_digest "$name" "$tag" 'application/vnd.oci.image.index.v1+json')
    [[ -n $digest ]] || die "registry has no index for $MULTI_REF after the push"
    mkdir -p "$STATE/pushed"
    echo "$keys $digest" >"$marker"
    log "image: $REGISTRY/$MULTI_REF pushed ($digest)"
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
    for spec in "${IMAGES[@]}"; do
        ensure_image "$spec"
    done
    ensure_multiarch_image
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
