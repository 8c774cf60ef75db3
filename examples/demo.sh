#!/bin/sh
# vrangefs in one minute: mount, store a file, mark it volatile, force a purge, read the report.
# Usage: examples/demo.sh [MOUNTPOINT]   (default /mnt/vrangefs; run as root after tools/setup.sh)
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
PATH="$here/.venv/bin:$PATH"
mnt=${1:-/mnt/vrangefs}

step() { printf '\n$ %s\n' "$*"; "$@"; }

mkdir -p "$mnt"
step vrangefs mount "$mnt"              # default cap: 50% of RAM
trap 'vrangefs umount "$mnt"' EXIT

step df -h "$mnt"
step dd if=/dev/urandom of="$mnt/thumbnail.cache" bs=1M count=16 status=none
step cp "$mnt/thumbnail.cache" "$mnt/keep.bin"
step ls -ls "$mnt"

# Mark the cache volatile with plain setfattr; the CLI does the same.
step setfattr -n user.vrange.volatile -v 0,0 "$mnt/thumbnail.cache"
step getfattr -n user.vrange.volatile "$mnt/thumbnail.cache"
step vrangefs status "$mnt/thumbnail.cache"

# Memory is needed: purge every volatile page (the cap and memory pressure do this by themselves).
step vrangefs purge "$mnt"
step vrangefs status "$mnt/thumbnail.cache"
printf '\n$ cat %s   # purged data is never returned as if it were valid\n' "$mnt/thumbnail.cache"
cat "$mnt/thumbnail.cache" >/dev/null || true

# Take the range back: the report says what was lost; --check makes it a test.
printf '\n$ vrangefs nonvolatile --check %s || regenerate\n' "$mnt/thumbnail.cache"
vrangefs nonvolatile --check "$mnt/thumbnail.cache" || echo "-> regenerating the cache"
step dd if="$mnt/keep.bin" of="$mnt/thumbnail.cache" bs=1M status=none conv=notrunc
step getfattr -n user.vrange.purged "$mnt/thumbnail.cache"
step cmp "$mnt/keep.bin" "$mnt/thumbnail.cache"
step vrangefs stats "$mnt"

# Programs that know nothing of volatile ranges (ccache, pip, thumbnailers): in a cache
# directory, closed files are evicted whole when memory is needed, and a missing file is a miss.
step mkdir "$mnt/ccache"
step vrangefs cachedir "$mnt/ccache"
step dd if=/dev/urandom of="$mnt/ccache/result.o" bs=1M count=4 status=none
step vrangefs purge "$mnt"                 # as the cap or memory pressure would
step ls -A "$mnt/ccache"                   # empty: result.o was evicted, a cache miss
