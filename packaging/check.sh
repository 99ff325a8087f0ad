#!/bin/bash
# Packaging checks for deployd.
#
#   packaging/check.sh --install-deps   install the tools the packaging tests
#                                       need (idempotent; Debian 12, as root)
#   packaging/check.sh                  run the packaging tests
#                                       (cargo test --test packaging --test packages)
#   packaging/check.sh --boot [USER_DATA]
#                                       build a .deb from target/debug/deployd
#                                       and run packaging/boot-test.sh with it
#
# The tests fail on a missing tool when CI is set, and skip otherwise.
set -euo pipefail

CARGO_DEB_VERSION=3.8.0
CARGO_GENERATE_RPM_VERSION=0.21.1
APT_PACKAGES=(cloud-init rpm shellcheck python3-yaml debootstrap)

cd "$(dirname "$0")/.."

installed_version() {
    # `cargo install --list` prints "name vX.Y.Z:" for each installed crate.
    cargo install --list | sed -n "s/^$1 v\([^:]*\):\$/\1/p"
}

install_deps() {
    local missing=()
    for p in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    if ((${#missing[@]})); then
        echo "check.sh: installing ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update
        apt-get install -y --no-install-recommends "${missing[@]}"
    fi
    if [[ "$(installed_version cargo-deb)" != "$CARGO_DEB_VERSION" ]]; then
        cargo install cargo-deb --version "$CARGO_DEB_VERSION" --locked
    fi
    if [[ "$(installed_version cargo-generate-rpm)" != "$CARGO_GENERATE_RPM_VERSION" ]]; then
        cargo install cargo-generate-rpm --version "$CARGO_GENERATE_RPM_VERSION" --locked
    fi
}

case "${1:-}" in
    --install-deps)
        install_deps
        ;;
    "")
        cargo test --locked --test packaging --test packages -- --nocapture
        ;;
    --boot)
        cargo build --locked
        # The man pages and shell completions the package ships (Cargo.toml's deb assets).
        "${CARGO_TARGET_DIR:-target}/debug/deployd" generate all --out "${CARGO_TARGET_DIR:-target}/debug/generated"
        out=$(mktemp -d)
        trap 'rm -rf "$out"' EXIT
        cargo deb --no-build --no-strip --fast --profile dev --quiet --output "$out/deployd.deb"
        packaging/boot-test.sh "$out/deployd.deb" ${2:+"$2"}
        ;;
    *)
        echo "usage: $0 [--install-deps | --boot [USER_DATA]]" >&2
        exit 64
        ;;
esac
