#!/usr/bin/env bash
# publish vs `aws s3 cp` for one file against a local moto_server; prints both times and the
# ratio. Usage: bench/publish.sh [SIZE_MIB] (default 256). Needs moto_server and the aws CLI;
# builds target/release/deployd if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
size_mib=${1:-256}
bin=${DEPLOYD_BIN:-${CARGO_TARGET_DIR:-target}/release/deployd}
[ -x "$bin" ] || cargo build --release --quiet
work=$(mktemp -d)
port=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
moto_server -H 127.0.0.1 -p "$port" >"$work/moto.log" 2>&1 &
moto=$!
trap 'kill $moto 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 100); do (echo >/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done
export AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_REGION=us-east-1 \
  AWS_EC2_METADATA_DISABLED=true AWS_ENDPOINT_URL="http://127.0.0.1:$port" DEPLOYD_CONFIG=$work/deployd.toml
: >"$work/deployd.toml"
aws s3 mb s3://bench >/dev/null
head -c $((size_mib << 20)) /dev/urandom >"$work/a.tar.gz"
cat "$work/a.tar.gz" >/dev/null # page cache warm for both
t() { local s e; s=$(date +%s.%N); "$@" >/dev/null 2>"$work/err" || { cat "$work/err"; exit 1; }; e=$(date +%s.%N); echo "$e - $s" | bc; }
runs=${RUNS:-3}
for i in $(seq "$runs"); do
  a=$(t aws s3 cp --only-show-errors "$work/a.tar.gz" "s3://bench/cli/$i.tar.gz")
  p=$(t "$bin" publish "$work/a.tar.gz" --bucket bench --app bench --environment e$i --commit 0123456789abcdef)
  echo "run $i: aws s3 cp ${a}s  deployd publish ${p}s  ratio $(echo "scale=2; $p / $a" | bc)"
done
