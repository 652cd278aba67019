#!/usr/bin/env bash
# Install what building and testing booking-worker needs on Debian/Ubuntu:
#   - C toolchain for the bundled librdkafka/zstd build: make gcc g++ pkg-config zlib1g-dev
#     libssl-dev (Kafka TLS and SASL through the system OpenSSL)
#   - PostgreSQL server binaries (throwaway test cluster, scripts/postgres.sh)
#   - the locales package and the de_DE.UTF-8 locale (generated with localedef
#     when missing): tests run PostgreSQL with lc_messages in German to prove
#     that the worker classifies errors by SQLSTATE, never by message text;
#     the server translates its messages only into a locale the C library has
#   - Java 17+ and Maven (the test Kafka broker, scripts/kafka.sh)
#   - the container tests (scripts/container-image.sh, tests/container/):
#     podman with runc, slirp4netns, uidmap, fuse-overlayfs and catatonit, and
#     debootstrap with debian-archive-keyring for the local stand-in of
#     debian:bookworm-slim (no image registry is needed)
#   - Prometheus and promtool (Debian's prometheus package): the unit tests
#     of the alert rules and the dashboard test (scripts/monitoring/,
#     tests/it/monitoring.rs). The package would start and enable its own
#     server on port 9090; it is installed with service starts refused, and
#     its unit disabled, since the tests start theirs on free ports
#   - rustup components rustfmt and clippy
# Idempotent and quick when everything is present: each item is checked first,
# and `apt-get update` runs at most once, only if something is missing.
#
# Usage: scripts/install-deps.sh [--build-only]
#   (as root to install; otherwise it only checks and lists what is missing)
#
#   --build-only   only what building the binary needs (the first two items:
#                  make gcc g++ pkg-config zlib1g-dev libssl-dev); nothing for
#                  the test services, no rustup components. The Dockerfile's
#                  build stage runs this, so the image is built with exactly
#                  the packages CI builds with. cargo itself is not installed
#                  here (rustup, or the Rust image, provides it).

set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
LOG_TAG="install-deps"
# shellcheck source=scripts/lib.sh
. "$SCRIPT_DIR/lib.sh"

build_only=0
for arg in "$@"; do
    case "$arg" in
        --build-only) build_only=1 ;;
        -h | --help)
            help_from_header "${BASH_SOURCE[0]}"
            exit 0
            ;;
        *) die "unknown argument: $arg (usage: scripts/install-deps.sh [--build-only])" ;;
    esac
done

# rustup installs cargo into ~/.cargo/bin; make it visible to a bare shell.
load_cargo_env

missing=()

# command -> Debian package
for pair in make:make gcc:gcc g++:g++ pkg-config:pkg-config; do
    if ! have "${pair%%:*}"; then
        missing+=("${pair#*:}")
    fi
done

for pkg in zlib1g-dev libssl-dev; do
    if ! deb_installed "$pkg"; then
        missing+=("$pkg")
    fi
done

# The test services: only without --build-only.
if [[ "$build_only" -eq 0 ]]; then
    # PostgreSQL server binaries (any version under /usr/lib/postgresql).
    pg_server_found=0
    for dir in /usr/lib/postgresql/*/bin; do
        if [[ -x "$dir/initdb" && -x "$dir/pg_ctl" ]]; then
            pg_server_found=1
        fi
    done
    if [[ "$pg_server_found" -eq 0 ]] && ! { have initdb && have pg_ctl; }; then
        missing+=(postgresql)
    fi

    java_version="$(java_major)"
    if [[ -z "$java_version" || "$java_version" -lt 17 ]]; then
        missing+=(openjdk-17-jre-headless)
    fi
    if ! have mvn; then
        missing+=(maven)
    fi
    # German server messages for the tests (see the header).
    if ! deb_installed locales; then
        missing+=(locales)
    fi
    # The container tests (see the header); installed without recommends,
    # as everything here.
    for pkg in podman runc slirp4netns uidmap fuse-overlayfs catatonit debootstrap debian-archive-keyring; do
        if ! deb_installed "$pkg"; then
            missing+=("$pkg")
        fi
    done
    # The monitoring tests (see the header).
    if ! { have prometheus && have promtool; }; then
        missing+=(prometheus)
    fi
fi

# apt_install with every service start refused (policy-rc.d exit 101, unless a
# policy is in place already), then the packages' units disabled: for
# packages whose own server the tests must not find running.
apt_install_stopped() {
    local policy=/usr/sbin/policy-rc.d pkg
    [[ $# -gt 0 ]] || return 0
    if [[ ! -e "$policy" ]]; then
        printf '#!/bin/sh\n# Written by booking-worker install-deps.sh for one install.\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    apt_install "$@"
    if [[ -e "$policy" ]] && grep -q 'booking-worker install-deps.sh' "$policy"; then
        rm -f "$policy"
        trap - EXIT
    fi
    # systemctl disables a unit without a running systemd too.
    have systemctl || return 0
    for pkg in "$@"; do
        systemctl disable "$pkg.service" >/dev/null 2>&1 || warn "could not disable $pkg.service"
        if [[ -d /run/systemd/system ]]; then
            systemctl stop "$pkg.service" >/dev/null 2>&1 || true
        fi
    done
}

if [[ ${#missing[@]} -gt 0 ]]; then
    if is_root && have apt-get; then
        log "missing: ${missing[*]}"
        plain=()
        stopped=()
        for pkg in "${missing[@]}"; do
            if [[ "$pkg" == prometheus ]]; then
                stopped+=("$pkg")
            else
                plain+=("$pkg")
            fi
        done
        apt_install "${plain[@]}"
        apt_install_stopped "${stopped[@]}"
    else
        die "missing packages: ${missing[*]} (run this script as root, or: sudo apt-get install ${missing[*]})"
    fi
else
    log "system packages: all present"
fi

if [[ "$build_only" -eq 1 ]]; then
    # Building also needs cargo, which this script does not install; say so
    # without failing, so the packages can be installed before rustup runs.
    have cargo || warn "cargo not found: install Rust with rustup (https://rustup.rs) before building"
    log "done (--build-only)"
    exit 0
fi

# The de_DE.UTF-8 locale (`locale -a` spells it de_DE.utf8).
have_de_locale() {
    grep -qi '^de_DE\.utf8$' <<<"$(locale -a 2>/dev/null || true)"
}
if have_de_locale; then
    log "locale de_DE.UTF-8: present"
elif is_root; then
    log "generating locale de_DE.UTF-8"
    # localedef may exit non-zero for mere warnings: the check below decides.
    localedef -i de_DE -f UTF-8 de_DE.UTF-8 >&2 || true
    if ! have_de_locale && have locale-gen; then
        warn "localedef did not create de_DE.UTF-8; trying locale-gen"
        if ! grep -q '^de_DE\.UTF-8 UTF-8' /etc/locale.gen 2>/dev/null; then
            echo 'de_DE.UTF-8 UTF-8' >>/etc/locale.gen
        fi
        locale-gen >&2 || true
    fi
    have_de_locale || die "could not generate the locale de_DE.UTF-8 (tests need German server messages)"
else
    die "locale de_DE.UTF-8 missing (tests need German server messages): run this script as root, or: sudo localedef -i de_DE -f UTF-8 de_DE.UTF-8"
fi

# Rust toolchain components.
have cargo || die "cargo not found: install Rust with rustup (https://rustup.rs)"
if have rustup; then
    installed="$(rustup component list --installed 2>/dev/null || true)"
    components=()
    for c in rustfmt clippy; do
        if ! grep -q "^$c" <<<"$installed"; then
            components+=("$c")
        fi
    done
    if [[ ${#components[@]} -gt 0 ]]; then
        log "rustup component add ${components[*]}"
        rustup component add "${components[@]}" >&2
    else
        log "rustup components: rustfmt and clippy present"
    fi
else
    warn "rustup not found; make sure rustfmt and clippy are installed"
fi

log "done"
