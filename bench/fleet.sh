#!/usr/bin/env bash
# The fleet test: FLEET_AGENTS (default 50) `deployd run` processes, each with its own state
# directory and a request-counting proxy, against one moto_server, following one release
# pointer polled every FLEET_POLL (default 1s). Publishes v1, v2, v3 and prints requests per
# idle poll and convergence time; then the rollout measurement (FLEET_POLL 5s for it unless
# set): S3 and EC2 requests per agent per idle hour, and publish --percent 100 to
# fleet status --wait returning 0. Takes a few minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
ulimit -n 8192 2>/dev/null || true
exec cargo test --release --test fleet -- --ignored --nocapture --test-threads 1 "$@"
