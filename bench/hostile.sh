#!/usr/bin/env bash
# Benchmark: peak RSS and wall time of `deployd deploy` for each bomb shape of tests/hostile.rs
# (huge PAX records and GNU long names, many extension headers, gigabytes of zeros after the
# end-of-archive marker, a large zstd window, sparse files, ...), on one local S3 server with
# the default [unpack] limits. With DEPLOYD_BEFORE set, the same runs for that binary too (an
# older build), side by side. Each run is cut off after TIMEOUT seconds (default 300).
#
#   bench/hostile.sh                          (needs a release build: cargo build --release)
#   DEPLOYD_BEFORE=/tmp/deployd-main bench/hostile.sh
#   CORPUS=DIR bench/hostile.sh               (keep/reuse the corpus in DIR)
set -euo pipefail
cd "$(dirname "$0")/.."
deployd=${DEPLOYD:-$PWD/target/release/deployd}
before=${DEPLOYD_BEFORE:-}
timeout_s=${TIMEOUT:-300}
[ -x "$deployd" ] || { echo "build first: cargo build --release" >&2; exit 1; }

# shellcheck source=bench/s3.sh
. bench/s3.sh
start_s3 hostile

corpus=${CORPUS:-$work/corpus}
if [ ! -d "$corpus" ]; then
    echo "== writing the corpus (tests/hostile.rs)"
    DEPLOYD_HOSTILE_CORPUS="$corpus" cargo test --quiet --locked --test hostile -- \
        --ignored write_corpus >/dev/null
fi

config() {
    cat >"$work/$1.toml" <<TOML
app = "app"
state_dir = "$work/$1/state"
runtime_dir = "$work/$1/run"
environment_file = "$work/environment"
[source]
allowed_buckets = ["bench"]
wait_for_artifact = "0s"
[s3]
endpoint_url = "$endpoint"
[containers]
enabled = false
[releases]
keep = 2
TOML
}

# One run: "exit rss_kib seconds", or "timeout ..." when cut off.
measure() {
    local bin=$1 cfg=$2 key=$3
    set +e
    DEPLOYD_CONFIG="$work/$cfg.toml" /usr/bin/time -f '%M %e' -o "$work/time" \
        timeout "$timeout_s" "$bin" deploy --no-containers --force --bucket bench --key "$key" \
        >/dev/null 2>"$work/$cfg.log"
    local code=$?
    set -e
    [ "$code" = 124 ] && code=timeout
    echo "$code $(tail -1 "$work/time")"
}

config after
[ -n "$before" ] && config before
printf '%-48s %10s %s\n' "shape (compressed size)" "" "exit, peak RSS KiB, seconds"
for f in "$corpus"/*; do
    name=$(basename "$f")
    aws --endpoint-url "$endpoint" s3 cp "$f" "s3://bench/hostile/$name" --quiet
    size=$(stat -c %s "$f")
    line="after: $(measure "$deployd" after "hostile/$name")"
    [ -n "$before" ] && line="before: $(measure "$before" before "hostile/$name")   $line"
    printf '%-48s %10s %s\n' "$name" "$size" "$line"
done
