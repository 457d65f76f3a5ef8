#!/usr/bin/env bash
# Packs what the lent GPU machine lacks into one folder that a device run carries (docs/gpu.md):
# that machine reaches no registry and has its own python3 (bench/gpu_image.txt). Run it here, where
# PyPI and Debian's archive answer, after scripts/bootstrap (it uses .venv's pip and packaging).
#
#   bench/gpu_kit.sh              .gpukit/: cp312 manylinux wheels of bench/gpu_kit.txt (bitsandbytes
#                                 trimmed to its CPU and CUDA 13 libraries) and Debian's redis-server
#                                 with the libraries it links; then the kit's and the tree's sizes
#                                 against the 64 MiB a run carries (exit 1 over it)
#   bench/gpu_kit.sh --rehearse   .cache/gpu-rehearsal/: a stand-in for that machine's Python
#                                 (bench/gpu_standin.txt, a venv of this machine's python3) and a kit
#                                 built for it, for `bench/gpu_check.sh --rehearse`
#
# GPUKIT_DIR puts the kit elsewhere; GPUKIT_BNB_KEEP names the bitsandbytes libraries kept ("cpu cuda13").
set -euo pipefail
cd "$(dirname "$0")/.."

BUDGET_MIB=64
IMAGE_PYTHON=3.12.3  # the lent machine's python3 (bench/gpu_image.txt)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64
           manylinux2014_x86_64 manylinux_2_5_x86_64 manylinux1_x86_64)
TOOL=${PYTHON:-.venv/bin/python}
# Not carried: glibc's own libraries, and the GCC runtime's that every machine running torch has.
SYSTEM_LIBS='^(linux-vdso|libc|libm|libdl|libpthread|librt|libresolv|ld-linux-x86-64|libstdc\+\+|libgcc_s)\.so'

say() { echo "gpu_kit: $*"; }
die() { echo "gpu_kit: $*" >&2; exit 1; }
pip_() { "$@" 2> >(grep -v "^WARNING: Location 'file:" >&2); }  # this machine's pip.conf names folders not there
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }

[ -x "$TOOL" ] || die "no $TOOL: run scripts/bootstrap first (this uses its pip and packaging), or set PYTHON"
rehearse=0
if [ "${1:-}" = "--rehearse" ]; then rehearse=1; fi

# --- the target Python ----------------------------------------------------------------------------
if [ $rehearse = 1 ]; then
  work=.cache/gpu-rehearsal
  kit=${GPUKIT_DIR:-$work/kit}
  standin=$work/python
  want="$(sha1sum bench/gpu_standin.txt | cut -c1-12) $(python3 -c 'import sys; print(sys.version.split()[0])')"
  if [ "$(cat "$standin/.installed" 2>/dev/null)" != "$want" ]; then
    say "building the stand-in for the lent machine's Python in $standin (bench/gpu_standin.txt)"
    rm -rf "$standin"
    python3 -m venv "$standin"
    "$TOOL" bench/gpu_kit.py seed "$standin/bin/python" bench/gpu_standin.txt > "$standin/rest.txt"
    say "$(grep -c . "$standin/rest.txt") of them to install, the rest linked from $TOOL's identical copies"
    if [ -s "$standin/rest.txt" ]; then
      pip_ "$standin/bin/python" -m pip install -q --no-deps --no-compile --disable-pip-version-check \
        -r "$standin/rest.txt"
    fi
    "$standin/bin/python" -m pip check --disable-pip-version-check >/dev/null \
      || die "the stand-in's packages do not meet each other's requirements: $("$standin/bin/python" -m pip check)"
    echo "$want" > "$standin/.installed"
  fi
  "$TOOL" bench/gpu_kit.py standin "$standin/bin/python" --image bench/gpu_image.txt
  target=$("$standin/bin/python" -c 'import platform; print(platform.python_version())')
  against=(--installed "$standin/bin/python")
else
  kit=${GPUKIT_DIR:-.gpukit}
  target=$IMAGE_PYTHON
  against=(--image bench/gpu_image.txt)
fi
minor=${target%.*}

case "$(realpath -m "$kit")" in /|"$(pwd)") die "GPUKIT_DIR=$kit would empty the checkout" ;; esac
[ -z "$(git ls-files "$kit" 2>/dev/null)" ] || die "$kit holds tracked files: choose another GPUKIT_DIR"
rm -rf "$kit"
mkdir -p "$kit/wheels" "$kit/bin" "$kit/redis/bin" "$kit/redis/lib"
kit=$(cd "$kit" && pwd)

# --- the wheels -----------------------------------------------------------------------------------
say "wheels of bench/gpu_kit.txt for CPython $minor, manylinux x86_64"
platform_args=()
for p in "${PLATFORMS[@]}"; do platform_args+=(--platform "$p"); done
pip_ "$TOOL" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --implementation cp \
  --python-version "$minor" "${platform_args[@]}" -d "$kit/wheels" -r bench/gpu_kit.txt
# shellcheck disable=SC2086  # GPUKIT_BNB_KEEP is a list of words
"$TOOL" bench/gpu_kit.py trim "$kit"/wheels/bitsandbytes-*.whl ${GPUKIT_BNB_KEEP:-cpu cuda13}
"$TOOL" bench/gpu_kit.py check "$kit/wheels" --python "$target" "${against[@]}"

# Where this machine has a Python 3.12, the cp312 wheels install with it and those of its modules that
# need nothing from the image import (the compiled ones among them).
py312=
for candidate in python3.12 $(find "$(pyenv root 2>/dev/null || echo /nonexistent)/versions" -maxdepth 3 \
                               -path '*/3.12*/bin/python3.12' 2>/dev/null | sort -rV); do
  if "$candidate" -c 'import sys' 2>/dev/null; then py312=$candidate; break; fi
done
if [ $rehearse = 0 ] && [ -n "$py312" ]; then
  site=$(mktemp -d)
  PIP_CONFIG_FILE=/dev/null "$py312" -m pip install -q --disable-pip-version-check --root-user-action=ignore --no-index --no-deps \
    --no-compile --target "$site" "$kit"/wheels/*.whl
  modules="hiredis tornado wcwidth redis kombu billiard vine amqp pytz dotenv tzlocal prompt_toolkit"
  PYTHONPATH=$site PYTHONNOUSERSITE=1 "$py312" -c "import sys
for m in sys.argv[1:]: __import__(m)
print('gpu_kit: Python', sys.version.split()[0], 'here: the wheels install offline and import:', ', '.join(sys.argv[1:]))" \
    $modules || die "the cp312 wheels do not import with $py312 (above)"
  rm -rf "$site"
else
  [ $rehearse = 1 ] || say "no Python 3.12 here: the cp312 wheels were not installed on one"
fi

# --- redis-server ---------------------------------------------------------------------------------
# Debian's redis-tools holds the binary (redis-server is a link to it); the libraries it links are
# taken from their Debian packages too, all but glibc's, so the machine needs only a new enough glibc.
debs=$(mktemp -d)
trap 'rm -rf "$debs"' EXIT
download() { (cd "$debs" && apt-get download -q=2 "$@" >/dev/null 2>&1); }
download redis-tools || { apt-get update -qq >/dev/null && download redis-tools; } \
  || die "apt-get download redis-tools failed: no Debian archive here?"
dpkg -x "$debs"/redis-tools_*.deb "$debs/root"
binary="$debs/root/usr/bin/redis-check-rdb"
[ -x "$binary" ] || die "redis-tools has no usr/bin/redis-check-rdb (the redis-server binary)"
libs=$(ldd "$binary" | awk '/=>/ { print $1, $3 }' | grep -Ev "$SYSTEM_LIBS" || true)
grep -q "not found" <<<"$libs" && die "redis-server links libraries this machine lacks: install redis-server here (scripts/bootstrap does)"
packages=$(while read -r name _; do dpkg -S "*/$name" | head -1 | cut -d: -f1; done <<<"$libs" | sort -u)
# shellcheck disable=SC2086  # a list of package names
download $packages || die "apt-get download $packages failed"
for deb in "$debs"/*.deb; do dpkg -x "$deb" "$debs/root"; done
cp "$binary" "$kit/redis/bin/redis-server"
while read -r name _; do
  found=$(find "$debs/root" -name "$name" | head -1)
  [ -n "$found" ] || die "$name is in none of $packages"
  cp -L "$found" "$kit/redis/lib/$name"
done <<<"$libs"
unresolved=$(LD_LIBRARY_PATH="$kit/redis/lib" ldd "$kit/redis/bin/redis-server" | awk '/=>/ { print $1, $3 }' \
  | grep -Ev "$SYSTEM_LIBS" | grep -v " $kit/redis/lib/" || true)
[ -z "$unresolved" ] || die "redis-server still takes these from this machine: $unresolved"
glibc=$(grep -aoh 'GLIBC_2\.[0-9]*' "$kit"/redis/bin/* "$kit"/redis/lib/* | sort -uV | tail -1)
versions=$(for deb in "$debs"/*.deb; do dpkg-deb -W --showformat='${Package} ${Version}\n' "$deb"; done)
cat > "$kit/bin/redis-server" <<EOF
#!/bin/sh
# Debian's redis-server with the libraries it links (bench/gpu_kit.sh; their packages in MANIFEST.txt):
# the machine's glibc must be ${glibc#GLIBC_} or newer.
kit=\$(cd "\$(dirname "\$0")/.." && pwd)
LD_LIBRARY_PATH="\$kit/redis/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}" exec "\$kit/redis/bin/redis-server" "\$@"
EOF
chmod +x "$kit/bin/redis-server"
server=$("$kit/bin/redis-server" --version | grep -o 'v=[0-9.]*' | cut -c3-)
nlibs=$(find "$kit/redis/lib" -type f | wc -l)
say "redis-server $server with $nlibs libraries ($(mib "$(du -sb "$kit/redis" | cut -f1)")); it needs glibc >= ${glibc#GLIBC_}"

# --- sizes ----------------------------------------------------------------------------------------
{
  echo "# bench/gpu_kit.sh, $(date -u +%Y-%m-%dT%H:%MZ), for CPython $target"
  (cd "$kit/wheels" && ls -1)
  echo "redis-server $server (needs glibc >= ${glibc#GLIBC_}), from Debian's packages:"
  echo "$versions"
} > "$kit/MANIFEST.txt"
if [ $rehearse = 0 ]; then
  rel=$(realpath --relative-to=. "$kit")
  if [ "${rel#..}" = "$rel" ] && ! git check-ignore -q "$rel/"; then
    echo "/$rel/" >> "$(git rev-parse --git-path info/exclude)"
    say "/$rel/ added to $(git rev-parse --git-path info/exclude)"
  fi
fi
kit_b=$(du -sb "$kit" | cut -f1)
wheels_b=$(du -sb "$kit/wheels" | cut -f1)
tree_b=$(git ls-files -z --cached --others --exclude-standard | xargs -0 stat -c %s 2>/dev/null | awk '{ s += $1 } END { print s + 0 }')
if [ -d shared ] && git check-ignore -q shared; then tree_b=$((tree_b + $(du -sb shared | cut -f1))); fi
total=$((kit_b + tree_b))
nwheels=$(find "$kit/wheels" -name '*.whl' | wc -l)
printf 'gpu_kit: %-10s %9s  (%s wheels %s; redis-server and its libraries %s)\n' "kit" "$(mib "$kit_b")" \
  "$nwheels" "$(mib "$wheels_b")" "$(mib $((kit_b - wheels_b)))"
printf 'gpu_kit: %-10s %9s  (tracked files and untracked ones git does not ignore)\n' "tree" "$(mib "$tree_b")"
printf 'gpu_kit: %-10s %9s  of the %s MiB a device run carries\n' "total" "$(mib "$total")" "$BUDGET_MIB"
[ "$total" -le $((BUDGET_MIB * 1048576)) ] || die "over the budget: the kit and the tree must fit in $BUDGET_MIB MiB"
say "ready: $kit"
