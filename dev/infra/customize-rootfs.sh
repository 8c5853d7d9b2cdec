#!/bin/bash
# Shapes an mmdebstrap rootfs into one of the test base images; runs on the host as a hook.
#
# usage: customize-rootfs.sh ROOT FLAVOR PYTHON META_OUT
#   ROOT      the rootfs directory mmdebstrap passes as "$1"
#   FLAVOR    distroless (extract variant, no shell) or slim (essential variant, has a shell)
#   PYTHON    the Python minor version the image carries, e.g. 3.11
#   META_OUT  host file that receives "python_version=X.Y.Z" for the image config
#
# The distroless flavor runs as an --extract-hook: nothing was installed, so there
# are no maintainer scripts to lean on and we write the files a real distroless
# image carries ourselves (passwd, group, CA bundle). The slim flavor runs as a
# --customize-hook on a properly installed system and only adds the nonroot user.
set -euo pipefail

root=${1:?ROOT}
flavor=${2:?FLAVOR}
python=${3:?PYTHON}
meta_out=${4:?META_OUT}

NONROOT_UID=65532

# Packages apt pulls in as dependencies of debconf/tzdata/ca-certificates that a
# distroless image does not ship. Nothing in them is needed to run Python.
DISTROLESS_DROP=" dpkg tar debconf perl-base mawk "

python_version() {
    # Upstream version of the interpreter package, e.g. 3.11.2-6+deb12u8 -> 3.11.2.
    local pkg="python${python}-minimal" version="" deb
    if [[ -s $root/var/lib/dpkg/status ]]; then
        version=$(dpkg-query --admindir="$root/var/lib/dpkg" -W -f='${Version}' "$pkg" 2>/dev/null || true)
    fi
    if [[ -z $version ]]; then
        for deb in "$root"/var/cache/apt/archives/"${pkg}"_*.deb; do
            [[ -e $deb ]] && version=$(dpkg-deb --field "$deb" Version)
        done
    fi
    [[ -n $version ]] || { echo "customize-rootfs: cannot find the version of $pkg" >&2; exit 1; }
    version=${version#*:}
    echo "${version%%-*}"
}

drop_packages() {
    # extract variant: remove the files of unwanted dependencies, read from their .debs.
    local deb pkg path target
    for deb in "$root"/var/cache/apt/archives/*.deb; do
        [[ -e $deb ]] || continue
        pkg=$(dpkg-deb --field "$deb" Package)
        [[ $DISTROLESS_DROP == *" $pkg "* ]] || continue
        while IFS= read -r path; do
            target="$root/${path#./}"
            if [[ -L $target || -f $target ]]; then
                rm -f "$target"
            fi
        done < <(dpkg-deb --fsys-tarfile "$deb" | tar -t)
    done
}

trim_docs() {
    rm -rf "$root"/usr/share/man "$root"/usr/share/info "$root"/usr/share/lintian \
        "$root"/usr/share/linda "$root"/usr/share/doc-base "$root"/var/cache/debconf/*-old
    if [[ -d $root/usr/share/locale ]]; then
        find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
    fi
    # Keep the copyright files, as distroless and debian-slim do.
    if [[ -d $root/usr/share/doc ]]; then
        find "$root/usr/share/doc" -mindepth 2 ! -type d ! -name copyright -delete
        find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete
    fi
}

write_distroless_accounts() {
    # The same entries as gcr.io/distroless/base's /etc/passwd and /etc/group.
    cat >"$root/etc/passwd" <<EOF
root:x:0:0:root:/root:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
nonroot:x:${NONROOT_UID}:${NONROOT_UID}:nonroot:/home/nonroot:/sbin/nologin
EOF
    cat >"$root/etc/group" <<EOF
root:x:0:
tty:x:5:
staff:x:50:
nobody:x:65534:
nonroot:x:${NONROOT_UID}:
EOF
    cat >"$root/etc/nsswitch.conf" <<EOF
passwd:         files
group:          files
shadow:         files
hosts:          files dns
networks:       files
protocols:      files
services:      files
ethers:         files
rpc:            files
EOF
    chmod 0644 "$root/etc/passwd" "$root/etc/group" "$root/etc/nsswitch.conf"
}

add_slim_nonroot() {
    grep -q '^nonroot:' "$root/etc/group" ||
        echo "nonroot:x:${NONROOT_UID}:" >>"$root/etc/group"
    grep -q '^nonroot:' "$root/etc/passwd" ||
        echo "nonroot:x:${NONROOT_UID}:${NONROOT_UID}:nonroot:/home/nonroot:/usr/sbin/nologin" >>"$root/etc/passwd"
    if [[ -f $root/etc/shadow ]] && ! grep -q '^nonroot:' "$root/etc/shadow"; then
        echo "nonroot:!:19000:0:99999:7:::" >>"$root/etc/shadow"
    fi
    if [[ -f $root/etc/gshadow ]] && ! grep -q '^nonroot:' "$root/etc/gshadow"; then
        echo "nonroot:!::" >>"$root/etc/gshadow"
    fi
}

write_ca_bundle() {
    # update-ca-certificates never ran (extract variant), so build its output file.
    local bundle="$root/etc/ssl/certs/ca-certificates.crt"
    mkdir -p "$root/etc/ssl/certs"
    find "$root/usr/share/ca-certificates" -name '*.crt' -print0 | LC_ALL=C sort -z |
        xargs -0 cat >"$bundle"
    chmod 0644 "$bundle"
    [[ -s $bundle ]] || { echo "customize-rootfs: empty CA bundle" >&2; exit 1; }
}

common_dirs() {
    mkdir -p "$root/home/nonroot" "$root/root" "$root/tmp"
    chown "$NONROOT_UID:$NONROOT_UID" "$root/home/nonroot"
    chmod 0700 "$root/home/nonroot" "$root/root"
    chmod 1777 "$root/tmp"
}

assert_no_shell() {
    local p
    for p in bin/sh usr/bin/sh bin/dash usr/bin/dash bin/bash usr/bin/bash; do
        if [[ -e $root/$p || -L $root/$p ]]; then
            echo "customize-rootfs: distroless rootfs has /$p" >&2
            exit 1
        fi
    done
}

version=$(python_version)
[[ -x $root/usr/bin/python$python ]] || { echo "customize-rootfs: no /usr/bin/python$python" >&2; exit 1; }

case $flavor in
distroless)
    drop_packages
    trim_docs
    write_distroless_accounts
    write_ca_bundle
    ln -sfn "../usr/share/zoneinfo/Etc/UTC" "$root/etc/localtime"
    # distroless ships python3 and python links next to the versioned binary.
    ln -sfn "python$python" "$root/usr/bin/python3"
    ln -sfn "python$python" "$root/usr/bin/python"
    common_dirs
    assert_no_shell
    ;;
slim)
    trim_docs
    add_slim_nonroot
    # python:3.X-slim keeps its interpreter in /usr/local/bin; link there so paths
    # written for the real image (venv home, shebangs) resolve in this stand-in.
    mkdir -p "$root/usr/local/bin"
    for name in "python$python" python3 python; do
        ln -sfn "/usr/bin/python$python" "$root/usr/local/bin/$name"
    done
    common_dirs
    [[ -x $root/bin/sh ]] || { echo "customize-rootfs: slim rootfs lacks /bin/sh" >&2; exit 1; }
    ;;
*)
    echo "customize-rootfs: unknown flavor '$flavor'" >&2
    exit 2
    ;;
esac

echo "python_version=$version" >"$meta_out"
