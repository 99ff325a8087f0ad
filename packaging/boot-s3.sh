#!/bin/bash
# Boot round trip: an instance-like container (systemd as PID 1, cloud-init NoCloud) boots with
# user data that names an artifact on a local S3 server, and deployd must deploy it before
# cloud-init's `deployd status --wait` returns.
#
#   packaging/boot-s3.sh            (root, Docker, debootstrap; builds a .deb from the debug binary)
#
# It starts an S3 server on the host's loopback, publishes a sample release under a versioned key
# with its SHA-256, writes user data (environment file with the key and the test credentials, a
# config pointing deployd at that S3), and runs packaging/boot-test.sh with `--network host`.
# The boot test fails if cloud-init's runcmd `deployd status --wait` fails, i.e. if the first
# deployment did not land.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v moto_server >/dev/null || python3 -m pip install --quiet 'moto[server]'
work=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
moto_server -H 127.0.0.1 -p "$port" >"$work/s3.log" 2>&1 &
s3_pid=$!
trap 'kill $s3_pid 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 100); do (echo >/dev/tcp/127.0.0.1/"$port") 2>/dev/null && break; sleep 0.1; done

mkdir -p "$work/app"
echo "booted release" >"$work/app/index.html"
tar -czf "$work/app.tar.gz" -C "$work/app" .
key="express-api/boot/1a2b3c4d-$(date -u +%Y%m%d-%H%M%S)/express-api-deployment.tar.gz"
sha=$(sha256sum "$work/app.tar.gz" | cut -d' ' -f1)
AWS_ACCESS_KEY_ID=boot AWS_SECRET_ACCESS_KEY=boot AWS_REGION=us-east-1 python3 - "$port" "$work/app.tar.gz" "$key" "$sha" <<'PY'
import boto3, sys
port, path, key, sha = sys.argv[1:]
s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}")
s3.create_bucket(Bucket="boot-artifacts")
s3.put_object(Bucket="boot-artifacts", Key=key, Body=open(path, "rb").read(),
              Metadata={"sha256": sha, "commit-sha": "1a2b3c4d00000000"})
PY

cat >"$work/user-data.yaml" <<YAML
#cloud-config
write_files:
  - path: /etc/deployd/environment
    owner: root:root
    permissions: '0600'
    content: |
      DEPLOYMENT_BUCKET=boot-artifacts
      DEPLOYMENT_KEY=$key
      DEPLOYMENT_SHA256=$sha
      AWS_ACCESS_KEY_ID=boot
      AWS_SECRET_ACCESS_KEY=boot
      AWS_REGION=us-east-1
      AWS_EC2_METADATA_DISABLED=true
  - path: /etc/deployd/deployd.toml
    owner: root:root
    permissions: '0644'
    content: |
      [s3]
      endpoint_url = "http://127.0.0.1:$port"
      [containers]
      enabled = false
      [report]
      ec2_tags = false
runcmd:
  - [systemctl, enable, --now, --no-block, deployd.service]
  - [deployd, status, --wait, --timeout, 5m]
  - [sh, -c, 'test "\$(cat /var/lib/deployd/current/index.html)" = "booted release"']
YAML
cargo build --locked --quiet
# The man pages and shell completions the package ships (Cargo.toml's deb assets).
"${CARGO_TARGET_DIR:-target}/debug/deployd" generate all --out "${CARGO_TARGET_DIR:-target}/debug/generated" >/dev/null
cargo deb --no-build --no-strip --fast --profile dev --quiet --output "$work/deployd.deb"
BOOT_RUN_ARGS="--network host" BOOT_TIMEOUT=600 packaging/boot-test.sh "$work/deployd.deb" "$work/user-data.yaml"
