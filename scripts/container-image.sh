#!/usr/bin/env bash
# Builds the container images the container tests run (tests/container/),
# with podman, on a machine that reaches Debian's package archive but no
# image registry.
#
# Usage: scripts/container-image.sh [worker|systemd|base|all]   (default: worker)
#
#   base     the local stand-in for debian:bookworm-slim (below)
#   worker   base, then the worker image from the repository's Dockerfile with
#            the prebuilt binary: from the repository root,
#              podman build --format docker --build-arg BINARY_FROM=prebuilt \
#                  --pull=never -t booking-worker:test .
#            (--format docker keeps HEALTHCHECK, which the OCI format drops).
#            Built every time (the binary changes); podman's layer cache keeps
#            the runtime stage's apt-get layer.
#   systemd  base, then an image with systemd as init for the unit tests
#            (tests/container/Containerfile.systemd: systemd, systemd-sysv,
#            dbus and the binary's libraries); built only when missing or
#            when the Containerfile changed.
#   all      worker and systemd
#
# debian:bookworm-slim here is NOT the official image from Docker Hub: no
# registry is reachable, so it is a local stand-in built from Debian's own
# packages with `debootstrap --variant=minbase bookworm`, then slimmed the way
# the official slim image is (no documentation, manual pages or translations,
# no apt lists or caches, the official image's apt and dpkg settings), and
# `podman import`ed as localhost/debian:bookworm-slim with the label
# booking-worker.stand-in. The rootfs tarball is cached in
# $BOOKING_WORKER_CACHE/images/ (default ~/.cache/booking-worker/images/), so
# debootstrap runs once per machine (about 40 s, 200 MB before slimming); the
# import runs when the image is missing from podman's storage.
#
# Environment:
#   BINARY            the binary put into the worker image (default
#                     target/release/booking-worker). Any other path is
#                     copied into a temporary build context that holds only
#                     the Dockerfile's prebuilt input and .dockerignore.
#   IMAGE, SYSTEMD_IMAGE, CONTAINERS_CONF: see tests/container/common.sh
#   DEBIAN_MIRROR           default http://deb.debian.org/debian
#   DEBIAN_SECURITY_MIRROR  default http://deb.debian.org/debian-security
#   BOOKING_WORKER_CACHE    cache root (default ~/.cache/booking-worker)
#
# Needs root (debootstrap, rootful podman) and podman, runc, debootstrap
# (scripts/install-deps.sh installs them). Exit 77 when podman is missing.
# Output: progress on stderr; on stdout one line per image it provided,
# BASE_IMAGE=..., IMAGE=..., SYSTEMD_IMAGE=..., each followed by
# <NAME>_SECONDS=<time it took>.

set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT_DIR="$(cd "$SCRIPT_DIR/.." && pwd)"
LOG_TAG="container-image"
# shellcheck source=scripts/lib.sh
. "$SCRIPT_DIR/lib.sh"
# shellcheck source=tests/container/common.sh
. "$ROOT_DIR/tests/container/common.sh"

what="${1:-worker}"
case "$what" in
    base | worker | systemd | all) ;;
    -h | --help)
        help_from_header "${BASH_SOURCE[0]}"
        exit 0
        ;;
    *) die "unknown argument: $what (usage: scripts/container-image.sh [worker|systemd|base|all])" ;;
esac

require_podman
is_root || die "needs root (debootstrap and rootful podman)"

BINARY="${BINARY:-$ROOT_DIR/target/release/booking-worker}"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
DEBIAN_SECURITY_MIRROR="${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"
CACHE_ROOT="${BOOKING_WORKER_CACHE:-$HOME/.cache/booking-worker}"
IMAGE_CACHE="$CACHE_ROOT/images"
# Bump when the recipe below changes, so that a cached tarball is rebuilt.
STANDIN_RECIPE=1
STANDIN_TARBALL="$IMAGE_CACHE/debian-bookworm-slim-standin-$STANDIN_RECIPE.tar"
SYSTEMD_CONTAINERFILE="$ROOT_DIR/tests/container/Containerfile.systemd"

WORK_DIR=""
cleanup() {
    if [[ -n "$WORK_DIR" ]]; then
        rm -rf "$WORK_DIR"
    fi
}
trap cleanup EXIT

# ---- the debian:bookworm-slim stand-in -----------------------------------------

# slim_rootfs DIR: what the official image's build (debuerreotype) does to a
# minbase rootfs, then what its slim variant removes.
slim_rootfs() {
    local root="$1"
    # apt and dpkg settings of the official image.
    cat >"$root/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
    printf 'Apt::AutoRemove::SuggestsImportant "false";\n' >"$root/etc/apt/apt.conf.d/docker-autoremove-suggests"
    printf 'Acquire::GzipIndexes "true";\n' >"$root/etc/apt/apt.conf.d/docker-gzip-indexes"
    printf 'Acquire::Languages "none";\n' >"$root/etc/apt/apt.conf.d/docker-no-languages"
    printf 'force-unsafe-io\n' >"$root/etc/dpkg/dpkg.cfg.d/docker-apt-speedup"
    printf '#!/bin/sh\n# Packages installed while an image is built start no services.\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
    chmod 0755 "$root/usr/sbin/policy-rc.d"
    # The slim variant: packages installed later leave these out too.
    cat >"$root/etc/dpkg/dpkg.cfg.d/docker" <<'EOF'
# The "slim" variant: files that are normally unnecessary in containers are
# left out, and this keeps them out.
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/lintian/overrides/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/man/*
EOF
    find "$root/usr/share/doc" -mindepth 1 ! -type d ! -name copyright -delete
    find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete
    rm -rf "$root/usr/share/groff/"* "$root/usr/share/info/"* "$root/usr/share/linda/"* \
        "$root/usr/share/lintian/overrides/"* "$root/usr/share/locale/"* "$root/usr/share/man/"*
    # Compiled locales: only C.utf8 (libc-bin's) is kept.
    find "$root/usr/lib/locale" -mindepth 1 -maxdepth 1 ! -name C.utf8 -exec rm -rf {} + 2>/dev/null || true
    # The official image's sources: the release, its updates and security.
    rm -f "$root/etc/apt/sources.list"
    cat >"$root/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $DEBIAN_MIRROR
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $DEBIAN_SECURITY_MIRROR
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    # No apt lists, caches, logs or host files.
    rm -rf "$root/var/lib/apt/lists/"* "$root/var/cache/apt/"* "$root/var/cache/debconf/"*-old \
        "$root/var/lib/dpkg/"*-old "$root/var/cache/ldconfig/aux-cache" "$root/tmp/"* "$root/var/tmp/"*
    mkdir -p "$root/var/lib/apt/lists/partial"
    find "$root/var/log" -type f -delete
    rm -f "$root/etc/resolv.conf" "$root/etc/hostname"
    : >"$root/etc/machine-id"
}

# Builds the tarball when it is not cached (serialised by a lock).
ensure_standin_tarball() {
    mkdir -p "$IMAGE_CACHE"
    exec 8>"$IMAGE_CACHE/.lock"
    if have flock; then
        flock 8
    fi
    if [[ -f "$STANDIN_TARBALL" ]]; then
        exec 8>&-
        log "stand-in rootfs cached: $STANDIN_TARBALL"
        return 0
    fi
    have debootstrap || die "debootstrap not found (scripts/install-deps.sh installs it)"
    WORK_DIR="$(mktemp -d "${TMPDIR:-/tmp}/booking-worker-standin.XXXXXX")"
    local rootfs="$WORK_DIR/rootfs" t0
    t0="$(now)"
    log "debootstrap --variant=minbase bookworm from $DEBIAN_MIRROR (one-time, cached in $IMAGE_CACHE)"
    if ! debootstrap --variant=minbase bookworm "$rootfs" "$DEBIAN_MIRROR" >"$WORK_DIR/debootstrap.log" 2>&1; then
        tail -n 30 "$WORK_DIR/debootstrap.log" >&2 || true
        die "debootstrap failed"
    fi
    log "debootstrap took $(elapsed "$t0") s ($(du -sh "$rootfs" | cut -f1)); slimming"
    slim_rootfs "$rootfs"
    tar --numeric-owner --xattrs --xattrs-include='*' -C "$rootfs" -cf "$WORK_DIR/rootfs.tar" .
    mv "$WORK_DIR/rootfs.tar" "$STANDIN_TARBALL"
    rm -rf "$WORK_DIR"
    WORK_DIR=""
    exec 8>&-
    log "cached $STANDIN_TARBALL ($(du -h "$STANDIN_TARBALL" | cut -f1)) after $(elapsed "$t0") s"
}

ensure_base() {
    local t0
    t0="$(now)"
    if podman image exists "$BASE_IMAGE"; then
        log "$BASE_IMAGE present"
    else
        ensure_standin_tarball
        log "podman import $STANDIN_TARBALL $BASE_IMAGE"
        podman import \
            --change 'CMD ["bash"]' \
            --change "LABEL booking-worker.stand-in=\"local stand-in for debian:bookworm-slim: debootstrap --variant=minbase bookworm, slimmed (scripts/container-image.sh); not the official image\"" \
            --message "local stand-in for debian:bookworm-slim (scripts/container-image.sh)" \
            --quiet "$STANDIN_TARBALL" "$BASE_IMAGE" >/dev/null
    fi
    echo "BASE_IMAGE=$BASE_IMAGE"
    echo "BASE_IMAGE_SECONDS=$(elapsed "$t0")"
}

# ---- the worker image ------------------------------------------------------------

# remove_leftovers OLD_ID: each build with a new binary leaves the previous
# image and the prebuilt stage's image (one copy of the binary each) untagged;
# remove those, and only those, so that test runs do not fill the disk. The
# runtime stage's apt-get layer stays cached (the new image uses it).
remove_leftovers() {
    local old_id="$1" id round
    if [[ -n "$old_id" && "$old_id" != "$(podman image inspect --format '{{.Id}}' "$IMAGE")" ]]; then
        podman rmi "$old_id" >/dev/null 2>&1 || true
    fi
    for round in 1 2 3 4 5 6 7 8 9 10 11 12; do
        : "$round"
        local removed=0
        for id in $(podman images --quiet --filter dangling=true); do
            if podman image inspect --format '{{range .History}}{{.CreatedBy}}{{"\n"}}{{end}}' "$id" 2>/dev/null |
                grep -q -e ' in /usr/src/booking-worker/target/release/booking-worker' \
                    -e ' in /usr/local/bin/booking-worker'; then
                podman rmi "$id" >/dev/null 2>&1 && removed=1
            fi
        done
        [[ "$removed" -eq 1 ]] || break
    done
}

build_worker() {
    local t0 context old_id
    t0="$(now)"
    [[ -f "$BINARY" && -x "$BINARY" ]] || die "no executable binary at $BINARY (build it: cargo build --release --locked --bin booking-worker, or set BINARY)"
    if [[ "$(realpath "$BINARY")" == "$(realpath -m "$ROOT_DIR/target/release/booking-worker")" ]]; then
        context="$ROOT_DIR"
    else
        # The Dockerfile's prebuilt stage reads target/release/booking-worker
        # of its context, and nothing else is read: a context with that file
        # and the repository's .dockerignore builds the same image.
        WORK_DIR="$(mktemp -d "${TMPDIR:-/tmp}/booking-worker-context.XXXXXX")"
        context="$WORK_DIR"
        mkdir -p "$context/target/release"
        cp "$BINARY" "$context/target/release/booking-worker"
        cp "$ROOT_DIR/.dockerignore" "$context/"
    fi
    old_id="$(podman image inspect --format '{{.Id}}' "$IMAGE" 2>/dev/null || true)"
    log "podman build --format docker --build-arg BINARY_FROM=prebuilt -t $IMAGE (context $context, binary $BINARY)"
    if ! (cd "$context" && podman build --format docker --pull=never \
        --build-arg BINARY_FROM=prebuilt -f "$ROOT_DIR/Dockerfile" -t "$IMAGE" .) >&2; then
        die "podman build of $IMAGE failed"
    fi
    if [[ "$context" != "$ROOT_DIR" ]]; then
        rm -rf "$WORK_DIR"
        WORK_DIR=""
    fi
    remove_leftovers "$old_id"
    echo "IMAGE=$IMAGE"
    echo "IMAGE_SECONDS=$(elapsed "$t0")"
}

# ---- the systemd test image ------------------------------------------------------

build_systemd() {
    local t0 recipe have_recipe
    t0="$(now)"
    recipe="$(sha256sum "$SYSTEMD_CONTAINERFILE" | cut -c1-16)"
    have_recipe="$(podman image inspect --format '{{ index .Config.Labels "booking-worker.recipe" }}' "$SYSTEMD_IMAGE" 2>/dev/null || true)"
    if [[ "$have_recipe" == "$recipe" ]]; then
        log "$SYSTEMD_IMAGE present (recipe $recipe)"
    else
        log "podman build -t $SYSTEMD_IMAGE -f tests/container/Containerfile.systemd (recipe $recipe)"
        if ! podman build --format docker --pull=never --label "booking-worker.recipe=$recipe" \
            -f "$SYSTEMD_CONTAINERFILE" -t "$SYSTEMD_IMAGE" "$ROOT_DIR/tests/container" >&2; then
            die "podman build of $SYSTEMD_IMAGE failed"
        fi
    fi
    echo "SYSTEMD_IMAGE=$SYSTEMD_IMAGE"
    echo "SYSTEMD_IMAGE_SECONDS=$(elapsed "$t0")"
}

ensure_base
case "$what" in
    worker) build_worker ;;
    systemd) build_systemd ;;
    all)
        build_worker
        build_systemd
        ;;
    base) ;;
esac
