#!/usr/bin/env bash
# Benchmark: deployd's fetch+unpack against what an operator would otherwise run.
#   (a) aws s3 cp to a file, then tar -xzf      (the baseline deployd replaces)
#   (b) deployd deploy --no-containers          (streaming download, hash and unpack)
#   (c) tar -xzf of the same file already on disk (the floor: no network at all)
#   (d) (c) followed by sync: deployd syncs the tree before activating it, tar does not
# on one local S3 server and one tar.gz of mixed small and large files (default 256 MiB), plus
# deployd's peak RSS for that artifact and for a 1 GiB one. Prints the times and the ratios.
# With SIGNED=1 the artifact is signed with minisign and deployd requires the signature (it then
# downloads, verifies, and only then unpacks); (a) becomes aws s3 cp + minisign -V + tar -xzf.
#
#   bench/pipeline.sh [SIZE_MIB] [RUNS]     (needs a release build: cargo build --release)
#   SIGNED=1 SKIP_1G=1 bench/pipeline.sh    (installs Debian's minisign for the baseline)
set -euo pipefail
cd "$(dirname "$0")/.."
size_mib=${1:-256}
runs=${2:-3}
deployd=${DEPLOYD:-$PWD/target/release/deployd}
[ -x "$deployd" ] || { echo "build first: cargo build --release" >&2; exit 1; }
signed=${SIGNED:-0}
if [ "$signed" = 1 ] && ! command -v minisign >/dev/null; then
    apt-get install -y -qq minisign >/dev/null
fi

# shellcheck source=bench/s3.sh
. bench/s3.sh
start_s3 bench

# Mixed content: many small text files, some medium and a few large binaries, sized so that
# the compressed archive is about SIZE_MIB.
make_artifact() {
    local mib=$1 out=$2
    python3 - "$work/tree-$mib" "$mib" <<'PY'
import os, random, sys
root, mib = sys.argv[1], int(sys.argv[2])
rnd = random.Random(42)
words = [b"const", b"return", b"function", b"deployd", b"express", b"import", b"export", b"value"]
total = 0
for i in range(4000):                       # small source-like files, 1-16 KiB, compressible
    d = os.path.join(root, "src", f"m{i % 97}")
    os.makedirs(d, exist_ok=True)
    n = rnd.randint(1, 16) << 10
    body = b" ".join(rnd.choice(words) for _ in range(n // 6))[:n]
    open(os.path.join(d, f"f{i}.js"), "wb").write(body)
    total += n // 4                         # roughly what it adds after gzip
for i in range(200):                        # medium assets, 64-512 KiB, incompressible
    d = os.path.join(root, "public", "assets")
    os.makedirs(d, exist_ok=True)
    n = rnd.randint(64, 512) << 10
    open(os.path.join(d, f"a{i}.bin"), "wb").write(os.urandom(n))
    total += n
big = max(0, (mib << 20) - total)           # the rest in a few large binaries
i = 0
while big > 0:
    n = min(big, 64 << 20)
    d = os.path.join(root, "node_modules", f"pkg{i}")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "blob.bin"), "wb") as f:
        f.write(os.urandom(n))
    big -= n
    i += 1
PY
    tar -C "$work/tree-$mib" -cf - . | gzip -1 >"$out"
    rm -rf "$work/tree-$mib"
}

now() { date +%s.%N; }
secs() { python3 -c "print(f'{$2 - $1:.3f}')"; }
median() { python3 -c "import statistics,sys; print(f'{statistics.median(map(float, sys.argv[1:])):.3f}')" "$@"; }

source_keys='allowed_buckets = ["bench"]'
if [ "$signed" = 1 ]; then
    minisign -G -W -p "$work/bench.pub" -s "$work/bench.key" >/dev/null
    source_keys="$source_keys
public_key = \"$(tail -1 "$work/bench.pub")\""
fi
cat >"$work/deployd.toml" <<TOML
app = "app"
state_dir = "$work/state"
runtime_dir = "$work/run"
environment_file = "$work/environment"
[source]
$source_keys
[s3]
endpoint_url = "$endpoint"
[containers]
enabled = false
[releases]
keep = 2
TOML
export DEPLOYD_CONFIG="$work/deployd.toml"

run_size() {
    local mib=$1 file="$work/artifact-$1.tar.gz" key="app/bench/$1/app-deployment.tar.gz"
    echo "== building a ${mib} MiB artifact"
    make_artifact "$mib" "$file"
    local bytes; bytes=$(stat -c %s "$file")
    aws --endpoint-url "$endpoint" s3 cp "$file" "s3://bench/$key" --quiet \
        --metadata "sha256=$(sha256sum "$file" | cut -d' ' -f1)"
    if [ "$signed" = 1 ]; then
        # The trusted comment deployd publish writes: the release identity the agent checks.
        local comment
        comment=$(printf 'timestamp:%s\tfile:app-deployment.tar.gz\tdeployd:1\tapp:app\tenv:bench\tseq:%s\tcommit:0123456789abcdef\tkey:%s' \
            "$(date +%s)" "$(date +%s%3N)" "$key")
        minisign -S -s "$work/bench.key" -m "$file" -x "$file.minisig" -t "$comment" >/dev/null
        aws --endpoint-url "$endpoint" s3 cp "$file.minisig" "s3://bench/$key.minisig" --quiet
    fi
    echo "artifact: $bytes bytes ($(tar -tzf "$file" | wc -l) entries)"
    local a=() b=() c=() d=()
    for r in $(seq "$runs"); do
        sync; rm -rf "$work/x" "$work/dl.tar.gz"; mkdir "$work/x"
        t0=$(now)
        aws --endpoint-url "$endpoint" s3 cp "s3://bench/$key" "$work/dl.tar.gz" --quiet
        if [ "$signed" = 1 ]; then
            aws --endpoint-url "$endpoint" s3 cp "s3://bench/$key.minisig" "$work/dl.minisig" --quiet
            minisign -V -q -p "$work/bench.pub" -m "$work/dl.tar.gz" -x "$work/dl.minisig"
        fi
        tar -xzf "$work/dl.tar.gz" -C "$work/x"
        t1=$(now); a+=("$(secs "$t0" "$t1")")

        sync; rm -rf "$work/x"; mkdir "$work/x"
        t0=$(now); tar -xzf "$file" -C "$work/x"; t1=$(now); c+=("$(secs "$t0" "$t1")")
        sync; rm -rf "$work/x"; mkdir "$work/x"; sync
        t0=$(now); tar -xzf "$file" -C "$work/x"; sync; t1=$(now); d+=("$(secs "$t0" "$t1")")

        sync
        t0=$(now)
        /usr/bin/time -f '%M' -o "$work/rss" "$deployd" deploy --no-containers --force \
            --bucket bench --key "$key" >/dev/null 2>"$work/deployd.log"
        t1=$(now); b+=("$(secs "$t0" "$t1")")
        echo "run $r: (a) ${a[-1]}s  (b) ${b[-1]}s  (c) ${c[-1]}s  (d) ${d[-1]}s  deployd peak RSS $(cat "$work/rss") KiB"
    done
    local ma mb mc md; ma=$(median "${a[@]}"); mb=$(median "${b[@]}"); mc=$(median "${c[@]}"); md=$(median "${d[@]}")
    echo "median (a) aws s3 cp$([ "$signed" = 1 ] && echo ' + minisign -V') + tar -xzf: ${ma}s"
    echo "median (b) deployd deploy:       ${mb}s"
    echo "median (c) local tar -xzf:       ${mc}s"
    echo "median (d) local tar -xzf + sync: ${md}s"
    python3 -c "print(f'ratio (b)/(a) = {$mb/$ma:.2f}  (goal <= 0.50)'); print(f'ratio (b)/(c) = {$mb/$mc:.2f}  (goal <= 1.25)'); print(f'ratio (b)/(d) = {$mb/$md:.2f}  (same durability)')"
    echo "deployd peak RSS, last run: $(( $(cat "$work/rss") / 1024 )) MiB (goal <= 64 MiB)"
    rm -f "$file" "$file.minisig"
}

run_size "$size_mib"
if [ "${SKIP_1G:-0}" != 1 ]; then
    echo "== peak RSS for a 1 GiB artifact (one run)"
    runs=1 run_size 1024
fi
