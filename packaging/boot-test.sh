#!/bin/bash
# Boot test: a Debian 12 system with systemd as PID 1, in a Docker container,
# goes through an image bake and a first boot the way an EC2 instance does.
#
#   packaging/boot-test.sh DEB [USER_DATA]
#
#   DEB        the deployd .deb to install (cargo deb output)
#   USER_DATA  cloud-config fed through cloud-init's NoCloud datasource
#              (default: cloud-init/ec2-user-data.yaml)
#
# 1. Builds the image deployd-boot:bookworm once (debootstrap of Debian 12
#    with systemd and cloud-init from Debian's mirror, then `docker import`);
#    later runs reuse it. Needs root, debootstrap and a Docker engine.
# 2. Bake: boots it, installs DEB, checks that deployd.service is enabled but
#    not started, and cleans cloud-init's state.
# 3. First boot: seeds USER_DATA, restarts the container (a reboot: /run is
#    a tmpfs), and checks that cloud-init wrote /etc/deployd/environment with
#    mode 0600, that its runcmd (`deployd status --wait`) succeeded, that
#    deployd.service is active under its sandbox, and that trigger files
#    survive a service restart.
#
# The host's Docker socket is bound into the container at /run/docker.sock,
# so deployd inside talks to the host's engine, as it does on an instance.
# The container gets every capability the engine may grant (not
# --privileged, which also asks for capabilities a nested engine may not
# have) and no seccomp or AppArmor profile, because systemd sets up the
# unit's sandbox (mount namespaces, seccomp filters) itself.
#
# Environment: DEPLOYD_BOOT_IMAGE (image tag), DEBIAN_MIRROR, BOOT_TIMEOUT
# (seconds to wait for cloud-init to finish, default 1200), KEEP=1 (leave
# the container running for inspection), BOOT_RUN_ARGS (extra `docker run`
# arguments, split on spaces; e.g. "--network host" so that deployd inside
# reaches an S3 test server listening on the host's loopback).
set -euo pipefail

IMAGE=${DEPLOYD_BOOT_IMAGE:-deployd-boot:bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
REPO=$(cd "$(dirname "$0")/.." && pwd)

if [[ $# -lt 1 || $# -gt 2 ]]; then
    echo "usage: $0 DEB [USER_DATA]" >&2
    exit 64
fi
DEB=$(realpath "$1")
USER_DATA=$(realpath "${2:-$REPO/cloud-init/ec2-user-data.yaml}")
[[ -f "$DEB" ]] || { echo "boot-test: $DEB does not exist; build it with cargo deb" >&2; exit 66; }
[[ -f "$USER_DATA" ]] || { echo "boot-test: $USER_DATA does not exist" >&2; exit 66; }

NAME=deployd-boot-$$
failures=0

log() { printf 'boot-test: %s\n' "$*" >&2; }
fail() { log "FAIL: $*"; failures=$((failures + 1)); }
pass() { log "ok: $*"; }
in_box() { docker exec "$NAME" "$@"; }
# check DESCRIPTION COMMAND...: passes when COMMAND succeeds.
check() {
    local what=$1
    shift
    if "$@"; then pass "$what"; else fail "$what"; fi
}

cleanup() {
    if [[ "${KEEP:-}" == 1 ]]; then
        log "container $NAME left running (KEEP=1); remove it with: docker rm -f $NAME"
    else
        docker rm -f "$NAME" >/dev/null 2>&1 || true
    fi
}

build_image() {
    if docker image inspect "$IMAGE" >/dev/null 2>&1; then
        return
    fi
    command -v debootstrap >/dev/null || { log "debootstrap is missing: apt-get install -y debootstrap"; exit 69; }
    local rootfs
    rootfs=$(mktemp -d)
    log "building $IMAGE with debootstrap into $rootfs"
    # python3-cffi-backend: debootstrap does not resolve the virtual
    # package python3-cryptography needs.
    debootstrap --variant=minbase \
        --include=systemd,systemd-sysv,dbus,cloud-init,python3-cffi-backend,procps,ca-certificates \
        bookworm "$rootfs" "$MIRROR" >"$rootfs.log" 2>&1 || {
        tail -20 "$rootfs.log" >&2
        rm -rf "$rootfs" "$rootfs.log"
        exit 69
    }
    # NoCloud from the seed directory; no network configuration (Docker
    # provides it); a locale that exists in a minimal system.
    cat >"$rootfs/etc/cloud/cloud.cfg.d/90-boot-test.cfg" <<'EOF'
datasource_list: [NoCloud, None]
network: {config: disabled}
locale: C.UTF-8
EOF
    echo deployd-boot >"$rootfs/etc/hostname"
    tar -C "$rootfs" -c . | docker import - "$IMAGE" >/dev/null
    rm -rf "$rootfs" "$rootfs.log"
}

# Waits until systemd has finished booting; prints the state.
wait_for_boot() {
    local state=
    for _ in $(seq 1 120); do
        state=$(in_box systemctl is-system-running 2>/dev/null || true)
        case "$state" in
            running | degraded) break ;;
        esac
        sleep 1
    done
    log "system state: $state"
    if [[ "$state" == degraded ]]; then
        in_box systemctl --failed --no-pager >&2 || true
    fi
}

trap cleanup EXIT
build_image

log "bake: booting $IMAGE as $NAME"
docker run -d --name "$NAME" --hostname deployd-boot \
    --cap-add ALL --cap-drop SYS_RESOURCE \
    --security-opt seccomp=unconfined --security-opt apparmor=unconfined \
    --tmpfs /run --tmpfs /run/lock \
    -v /sys/fs/cgroup:/sys/fs/cgroup \
    -v /run/docker.sock:/run/docker.sock \
    --stop-signal SIGRTMIN+3 \
    ${BOOT_RUN_ARGS:+$BOOT_RUN_ARGS} \
    "$IMAGE" /lib/systemd/systemd >/dev/null
wait_for_boot
check "systemd is PID 1" test "$(in_box cat /proc/1/comm)" = systemd

docker cp "$DEB" "$NAME:/tmp/deployd.deb"
in_box dpkg -i /tmp/deployd.deb >&2
check "the package enabled deployd.service" test "$(in_box systemctl is-enabled deployd.service)" = enabled
if in_box systemctl is-active --quiet deployd.service; then
    fail "installing the package started deployd.service"
else
    pass "installing the package did not start deployd.service"
fi
in_box cloud-init clean --logs
in_box install -d /var/lib/cloud/seed/nocloud
printf 'instance-id: deployd-boot-%s\nlocal-hostname: deployd-boot\n' "$$" |
    docker exec -i "$NAME" tee /var/lib/cloud/seed/nocloud/meta-data >/dev/null
docker exec -i "$NAME" tee /var/lib/cloud/seed/nocloud/user-data <"$USER_DATA" >/dev/null

log "first boot: restarting $NAME with the user data"
docker restart -t 30 "$NAME" >/dev/null
wait_for_boot
# cloud-final runs after multi-user.target, which waits for deployd's
# READY=1, i.e. for the first deployment; bound the wait.
if timeout "${BOOT_TIMEOUT:-1200}" docker exec "$NAME" cloud-init status --wait --long >&2; then
    pass "cloud-init finished without errors (runcmd: deployd status --wait)"
else
    fail "cloud-init reported errors"
    in_box sh -c 'tail -40 /var/log/cloud-init-output.log' >&2 || true
fi
perms=$(in_box stat -c '%a %U:%G' /etc/deployd/environment 2>/dev/null || echo missing)
check "/etc/deployd/environment is 600 root:root (found: $perms)" test "$perms" = "600 root:root"

if in_box systemctl is-active --quiet deployd.service; then
    pass "deployd.service is active"
else
    fail "deployd.service is not active"
fi
in_box systemctl status deployd.service --no-pager -l >&2 || true
pid=$(in_box systemctl show -p MainPID --value deployd.service)
if [[ "$pid" != 0 ]]; then
    sandbox=$(in_box grep -E '^(CapBnd|NoNewPrivs|Seccomp):' "/proc/$pid/status" | tr -s '\t\n' '  ')
    log "sandbox of PID $pid: $sandbox"
    check "seccomp filter and no_new_privs are in force" \
        grep -q 'NoNewPrivs: 1 .*Seccomp: 2' <<<"$sandbox"
    if in_box nsenter -t "$pid" -m sh -c 'touch /etc/deployd/.boot-test' 2>/dev/null; then
        fail "deployd's mount namespace can write /etc"
    else
        pass "/etc is read-only for deployd"
    fi
fi
in_box systemd-analyze security deployd.service --no-pager | tail -1 >&2

in_box sh -c 'touch /run/deployd/triggers/.boot-test-keep'
in_box systemctl restart deployd.service
if in_box test -e /run/deployd/triggers/.boot-test-keep; then
    pass "trigger files survive a service restart"
else
    fail "a service restart removed /run/deployd/triggers contents"
fi
in_box rm -f /run/deployd/triggers/.boot-test-keep
in_box systemctl reload deployd.service
sleep 2
check "deployd.service is active after systemctl reload" in_box systemctl is-active --quiet deployd.service
in_box journalctl -u deployd.service --no-pager -n 30 >&2 || true

if ((failures)); then
    log "$failures check(s) failed"
    exit 1
fi
log "all checks passed"
