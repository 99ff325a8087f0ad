# shellcheck shell=bash
# Sourced by the benchmarks: a local S3 server (moto) on a free loopback port with one bucket,
# `bench`, and a scratch directory. After `start_s3 NAME`: $work (removed on exit), $endpoint,
# and the AWS variables the aws CLI and deployd read. The server is stopped on exit.
start_s3() {
    command -v moto_server >/dev/null || python3 -m pip install --quiet 'moto[server]'
    command -v aws >/dev/null || python3 -m pip install --quiet awscli
    work=$(mktemp -d "/var/tmp/deployd-$1.XXXXXX")
    local port
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    moto_server -H 127.0.0.1 -p "$port" >"$work/s3.log" 2>&1 &
    s3_pid=$!
    trap 'kill $s3_pid 2>/dev/null || true; rm -rf "$work"' EXIT
    export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench AWS_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true
    endpoint="http://127.0.0.1:$port"
    for _ in $(seq 100); do (echo >/dev/tcp/127.0.0.1/"$port") 2>/dev/null && break; sleep 0.1; done
    aws --endpoint-url "$endpoint" s3 mb s3://bench >/dev/null
}
