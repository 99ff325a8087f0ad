#!/usr/bin/env bash
# Benchmark deployd's image builds, side by side in one run, against what a user would otherwise
# run: the engine's BuildKit driven directly (`docker buildx build` when the CLI has buildx, else
# the Engine API's `/build?version=2` with curl, as `DOCKER_BUILDKIT=1 docker build` needs buildx
# on Docker 23+), and the classic builder (`DOCKER_BUILDKIT=0 docker build`). The direct
# BuildKit build gets what a user would pass: `--cache-from` the previous image and
# `BUILDKIT_INLINE_CACHE=1`.
#
# Builders: deployd (BuildKit where the engine has it), deployd_classic (deployd forced to the
# classic builder), buildkit (direct), cli (classic docker build).
# For two apps (the test fixture and a heavier multi-stage Dockerfile) and each builder it times:
#   cold build (no images, no builder cache) -> rebuild after a code-only change (cache from the
#   previous release) -> rebuild after `docker builder prune -af` + `docker image prune -f`
#   (cache only through cache_from = the previous release's images).
# and prints time and cache hits, then the ratios of deployd to each other builder.
#
# Usage: bench/containers.sh [ROUNDS]   (needs Docker, busybox-static, python3, curl)
#   PROFILE=dev bench/containers.sh     use a debug build (the engine's time dominates every build)
#   APPS=multistage MODES="deployd buildkit" bench/containers.sh   a subset
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-1}
MODES=${MODES:-deployd deployd_classic buildkit cli}
APPS=${APPS:-fixture multistage}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
PROFILE=${PROFILE:-release}
cargo build --profile "$PROFILE" --example containers_build -q
BIN=$CARGO_TARGET_DIR/$([ "$PROFILE" = dev ] && echo debug || echo "$PROFILE")/examples/containers_build
BASE=deployd-test-busybox:1
SOCK=${DOCKER_HOST:-unix:///var/run/docker.sock}; SOCK=${SOCK#unix://}
WORK=$(mktemp -d); trap 'rm -rf "$WORK"' EXIT

if ! docker image inspect $BASE >/dev/null 2>&1; then
  r=$WORK/rootfs; mkdir -p $r/bin $r/etc $r/tmp $r/www; cp /bin/busybox $r/bin/
  for a in $(/bin/busybox --list); do [ "$a" = busybox ] || ln -s busybox $r/bin/$a; done
  echo 'root:x:0:0:root:/:/bin/sh' > $r/etc/passwd
  tar -C $r -c . | docker import -c 'ENV PATH=/bin' - $BASE >/dev/null
fi

ms() { echo $(( $(date +%s%N) / 1000000 )); }

# make_app NAME KIND VERSION DIR
make_app() {
  local name=$1 kind=$2 version=$3 dir=$4
  mkdir -p $dir/src $dir/static
  echo "$version" > $dir/src/version
  echo "static" > $dir/static/index.html
  echo "left-pad@1.3.0" > $dir/package.txt
  if [ $kind = fixture ]; then
    cat > $dir/Dockerfile <<DF
FROM $BASE
RUN mkdir -p /www && echo base > /www/base.txt
RUN echo deps > /deps.txt && sleep 0.2
COPY static/ /www/static/
ARG APP_ENV=dev
RUN echo "\$APP_ENV" > /www/env
COPY package.txt /www/
COPY . /www/ctx/
COPY src/version /www/version
ARG GIT_COMMIT_HASH=unknown
RUN echo "\$GIT_COMMIT_HASH" > /www/commit
CMD ["httpd", "-f", "-p", "8080", "-h", "/www"]
DF
  else
    cat > $dir/Dockerfile <<DF
FROM $BASE AS deps
RUN mkdir -p /deps && for i in 1 2 3 4 5 6; do dd if=/dev/urandom of=/deps/blob\$i bs=1M count=8 2>/dev/null; done
RUN sleep 2 && echo installed > /deps/ok
COPY package.txt /deps/
RUN sleep 1 && cat /deps/package.txt > /deps/lock
FROM $BASE AS build
COPY --from=deps /deps /deps
COPY src/ /src/
RUN sleep 1 && cat /src/* /deps/lock > /app.bin
FROM $BASE
RUN mkdir -p /app && dd if=/dev/zero of=/app/runtime bs=1M count=16 2>/dev/null
COPY --from=deps /deps/lock /app/lock
COPY --from=build /app.bin /app/app.bin
ARG GIT_COMMIT_HASH=unknown
RUN echo "\$GIT_COMMIT_HASH" > /app/commit
CMD ["httpd", "-f", "-p", "8080", "-h", "/app"]
DF
  fi
  cat > $dir/docker-compose.yml <<YML
services:
  app:
    build:
      context: .
      cache_from: [bench-$name-app:latest]
    image: bench-$name-app:latest
YML
}

# The engine runs one prune at a time; another user's may be under way.
builder_prune() {
  for _ in $(seq 1 30); do docker builder prune -af >/dev/null 2>&1 && return; sleep 2; done
  docker builder prune -af >/dev/null
}
reset() {
  local repo=$1
  docker rmi -f $(docker images -q "$repo" | sort -u) >/dev/null 2>&1 || true
  builder_prune; docker image prune -f >/dev/null
}
prune() { builder_prune; docker image prune -f >/dev/null; }

# build_MODE NAME RELEASE PREV -> prints "ms hits steps"
build_deployd() {
  local name=$1 rel=$2 prev=${3:-} out t0 t1
  t0=$(ms)
  if [ -n "$prev" ]; then out=$($BIN bench-$name $rel $WORK/$name/$rel $prev $WORK/$name/$prev $EXTRA 2>$WORK/err)
  else out=$($BIN bench-$name $rel $WORK/$name/$rel $EXTRA 2>$WORK/err); fi
  t1=$(ms)
  [ -n "$out" ] || { echo "deployd build $name $rel failed: $(cat $WORK/err)" >&2; exit 1; }
  python3 -c 'import json,sys; d=json.loads(sys.argv[1]); print(sys.argv[2], d["hits"], d["cacheable"], d["ms"])' "$out" $((t1-t0))
}
build_deployd_classic() { EXTRA=--classic build_deployd "$@"; }
build_cli() {
  local name=$1 rel=$2 prev=${3:-} repo=bench-$name-app out t0 t1 cf=()
  cf=(--cache-from $repo:latest); [ -n "$prev" ] && cf+=(--cache-from $repo:$prev)
  t0=$(ms)
  out=$(DOCKER_BUILDKIT=0 docker build -q=false --rm --force-rm "${cf[@]}" -t $repo:$rel \
    --build-arg GIT_COMMIT_HASH=benchcommit --label deployd.project=bench-$name \
    --label deployd.release=$rel --label deployd.commit=benchcommit $WORK/$name/$rel 2>&1)
  docker tag $repo:$rel $repo:latest
  t1=$(ms)
  echo "$((t1-t0)) $(grep -c -- '---> Using cache' <<<"$out" || true) $(grep '^Step ' <<<"$out" | grep -v ' : LABEL deployd\.' | grep -vc ' : FROM ' || true) -"
}
build_buildkit() {
  local name=$1 rel=$2 prev=${3:-} repo=bench-$name-app t0 t1 cf q
  if docker buildx version >/dev/null 2>&1; then
    local out cfa=(--cache-from $repo:latest); [ -n "$prev" ] && cfa+=(--cache-from $repo:$prev)
    t0=$(ms)
    out=$(docker buildx build --load --progress=plain "${cfa[@]}" -t $repo:$rel --build-arg GIT_COMMIT_HASH=benchcommit \
      --build-arg BUILDKIT_INLINE_CACHE=1 --label deployd.project=bench-$name --label deployd.release=$rel \
      --label deployd.commit=benchcommit $WORK/$name/$rel 2>&1)
    docker tag $repo:$rel $repo:latest
    t1=$(ms)
    echo "$((t1-t0)) $(grep -cE '^#[0-9]+ CACHED' <<<"$out" || true) ? -"
    return
  fi
  cf="[\"$repo:latest\"$( [ -n "$prev" ] && echo ",\"$repo:$prev\"" )]"
  q=$(python3 -c 'import json,sys,urllib.parse as u; print(u.urlencode({"version":"2","t":sys.argv[1],"cachefrom":sys.argv[2],
    "buildargs":json.dumps({"GIT_COMMIT_HASH":"benchcommit","BUILDKIT_INLINE_CACHE":"1"}),
    "labels":json.dumps({"deployd.project":sys.argv[3],"deployd.release":sys.argv[4],"deployd.commit":"benchcommit"})}))' \
    "$repo:$rel" "$cf" "bench-$name" "$rel")
  t0=$(ms)
  res=$(tar -C $WORK/$name/$rel -c . | curl -sf --unix-socket "$SOCK" -X POST -H 'Content-Type: application/x-tar' \
    --data-binary @- "http://localhost/v1.41/build?$q" | python3 bench/bkdecode.py 2>/dev/null)
  docker tag $repo:$rel $repo:latest
  t1=$(ms)
  set -- $res
  echo "$((t1-t0)) $4 $2 -"
}

declare -A T
EXTRA=
for name in $APPS; do
  kind=$name; [ $name = multistage ] && kind=heavy
  for r in r1 r2 r3; do make_app $name $kind "version $r" $WORK/$name/$r; done
  # Rounds outside, builders inside: every builder meets the same load on this shared machine.
  for round in $(seq 1 $ROUNDS); do
    for mode in $MODES; do
      reset bench-$name-app
      set -- $(build_$mode $name r1);      T[$name,$mode,cold]+="$1 "; T[$name,$mode,cold,hits]="$2/$3"
      set -- $(build_$mode $name r2 r1);   T[$name,$mode,code]+="$1 "; T[$name,$mode,code,hits]="$2/$3"
      prune
      set -- $(build_$mode $name r3 r2);   T[$name,$mode,pruned]+="$1 "; T[$name,$mode,pruned,hits]="$2/$3"
    done
    reset bench-$name-app
  done
done

med() { tr ' ' '\n' <<<"$1" | grep . | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
printf '\n%-11s %-16s %10s %10s %10s   %-9s %-9s %-9s\n' app builder cold_ms code_ms pruned_ms hits_cold hits_code hits_prune
for name in $APPS; do
  for mode in $MODES; do
    printf '%-11s %-16s %10s %10s %10s   %-9s %-9s %-9s\n' $name $mode \
      $(med "${T[$name,$mode,cold]}") $(med "${T[$name,$mode,code]}") $(med "${T[$name,$mode,pruned]}") \
      ${T[$name,$mode,cold,hits]} ${T[$name,$mode,code,hits]} ${T[$name,$mode,pruned,hits]}
  done
  [[ " $MODES " == *" deployd "* ]] && for other in $MODES; do
    [ $other = deployd ] && continue
    for phase in cold code pruned; do
      d=$(med "${T[$name,deployd,$phase]}"); c=$(med "${T[$name,$other,$phase]}")
      printf '  %s %-6s deployd/%-16s = %s\n' $name $phase $other $(python3 -c "print(f'{$d/$c:.2f}x')")
    done
  done
done
echo
echo "hits are cache hits / cacheable steps of the build: all but FROM (and, for the classic builder, the LABEL steps it appends for --label; it also counts ARG as a step, BuildKit does not)."
echo "deployd times include process start and engine connect."
$BIN 2>/dev/null || true
