#!/usr/bin/env bash
# Instructions executed by `deployd deploy --no-containers` for one artifact, counted by
# valgrind's callgrind: unlike wall time, the count does not move with the machine's load, so two
# builds can be compared to a fraction of a percent on a busy host. With BEFORE=path, that binary
# and the current one alternate and the ratio is printed.
#
#   cargo build --release && BEFORE=/path/to/old/deployd bench/instructions.sh [SIZE_MIB] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
mib=${1:-32}
rounds=${2:-2}
after=${DEPLOYD:-$PWD/target/release/deployd}
before=${BEFORE:-}
[ -x "$after" ] || { echo "build first: cargo build --release" >&2; exit 1; }
command -v valgrind >/dev/null || apt-get install -y -qq valgrind >/dev/null

# shellcheck source=bench/s3.sh
. bench/s3.sh
start_s3 ir

# Deterministic content (seeded): source-like files and incompressible blobs.
python3 - "$work/tree" "$mib" <<'PY'
import os, random, sys
root, mib = sys.argv[1], int(sys.argv[2])
rnd = random.Random(42)
words = [b"const", b"return", b"function", b"deployd", b"express", b"import", b"export", b"value"]
total = 0
for i in range(2000):
    d = os.path.join(root, "src", f"m{i % 97}")
    os.makedirs(d, exist_ok=True)
    n = rnd.randint(1, 16) << 10
    open(os.path.join(d, f"f{i}.js"), "wb").write(b" ".join(rnd.choice(words) for _ in range(n // 6))[:n])
    total += n // 4
big, i = max(0, (mib << 20) - total), 0
while big > 0:
    n = min(big, 8 << 20)
    d = os.path.join(root, "node_modules", f"pkg{i}")
    os.makedirs(d, exist_ok=True)
    open(os.path.join(d, "blob.bin"), "wb").write(rnd.randbytes(n))
    big -= n
    i += 1
PY
tar -C "$work/tree" -cf - . | gzip -1 >"$work/a.tar.gz"
rm -rf "$work/tree"
aws --endpoint-url "$endpoint" s3 cp "$work/a.tar.gz" s3://bench/app/a.tar.gz --quiet \
    --metadata "sha256=$(sha256sum "$work/a.tar.gz" | cut -d' ' -f1)"
echo "artifact: $(stat -c %s "$work/a.tar.gz") bytes, $(tar -tzf "$work/a.tar.gz" | wc -l) entries"

count() {
    rm -rf "$work/state" "$work/run"
    cat >"$work/deployd.toml" <<TOML
app = "app"
state_dir = "$work/state"
runtime_dir = "$work/run"
environment_file = "$work/environment"
[source]
allowed_buckets = ["bench"]
[s3]
endpoint_url = "$endpoint"
[containers]
enabled = false
TOML
    DEPLOYD_CONFIG="$work/deployd.toml" valgrind --tool=callgrind --callgrind-out-file=/dev/null \
        "$1" deploy --no-containers --force --bucket bench --key app/a.tar.gz >/dev/null 2>"$work/vg.log"
    sed -n 's/.*Collected : \([0-9]*\).*/\1/p' "$work/vg.log" | tail -1
}

declare -a b=() a=()
for r in $(seq "$rounds"); do
    if [ -n "$before" ]; then b+=("$(count "$before")"); echo "round $r: before ${b[-1]}"; fi
    a+=("$(count "$after")"); echo "round $r: after  ${a[-1]}"
done
if [ -n "$before" ]; then
    python3 -c "import statistics,sys; n=len(sys.argv)//2; b=statistics.median(map(int,sys.argv[1:n+1])); a=statistics.median(map(int,sys.argv[n+1:])); print(f'instructions: before {b:,.0f}, after {a:,.0f}, after/before {a/b:.3f}')" "${b[@]}" "${a[@]}"
fi
