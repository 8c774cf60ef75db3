#!/bin/sh
# Volatile ranges from the shell, with nothing but dd, setfattr and getfattr (package attr).
# Usage: examples/shell_example.sh MOUNTPOINT   (a vrangefs mount you may write to)
#
# Prints each command before running it and checks what it did; exits non-zero (and says
# which step) as soon as anything behaves otherwise than the contract says.  It purges every
# volatile page of the mount (step 3): use a mount whose other volatile data may go.
set -u
mnt=${1:?usage: $0 MOUNTPOINT}
f="$mnt/shell-example.$$"
size=1048576 # 256 pages of 4096 bytes
copy=$(mktemp)
trap 'rm -f "$copy" "$f"' EXIT

step() { printf '\n$ %s\n' "$*"; "$@"; }
fail() {
	printf 'FAILED: %s\n' "$*" >&2
	exit 1
}
# value ATTR FILE: the attribute's raw value (empty if it is empty)
value() { getfattr --absolute-names --only-values -n "$1" "$2"; }
expect() { # expect ATTR FILE WANTED
	got=$(value "$1" "$2") || fail "getfattr -n $1 $2 failed"
	[ "$got" = "$3" ] || fail "$1 of $2 is '$got', expected '$3'"
}

echo "# 1. write 1 MiB (and keep a copy elsewhere, to regenerate it later)"
step dd if=/dev/urandom of="$copy" bs=4096 count=256 status=none || fail "dd to $copy"
step dd if="$copy" of="$f" bs=4096 status=none || fail "dd to $f"

echo
echo "# 2. mark the whole file volatile: the filesystem may purge it when it needs memory"
step setfattr -n user.vrange.volatile -v 0,0 "$f" || fail "setfattr volatile"
step getfattr --absolute-names -n user.vrange.volatile "$f" || fail "getfattr volatile"
expect user.vrange.volatile "$f" "0,$size"
step dd if="$f" of=/dev/null bs=4096 status=none || fail "a volatile, unpurged file must read"

echo
echo "# 3. purge every volatile page of the mount now (memory pressure or the cap would do it)"
step setfattr -n user.vrange.purge -v all "$mnt" || fail "setfattr purge"
step getfattr --absolute-names -n user.vrange.purged "$f" || fail "getfattr purged"
expect user.vrange.purged "$f" "0,$size"

echo
echo "# 4. reading purged pages fails with EIO: lost bytes are never passed off as data"
printf '\n$ dd if=%s of=/dev/null bs=4096\n' "$f"
if err=$(dd if="$f" of=/dev/null bs=4096 2>&1); then
	fail "dd read a purged file without an error"
fi
printf '%s\n' "$err"
case $err in
*"Input/output error"*) ;;
*) fail "dd failed, but not with EIO" ;;
esac

echo
echo "# 5. take the range back; user.vrange.purged says what was lost"
step setfattr -n user.vrange.nonvolatile -v 0,0 "$f" || fail "setfattr nonvolatile"
step getfattr --absolute-names -n user.vrange.purged "$f" || fail "getfattr purged"
expect user.vrange.purged "$f" "0,$size"
expect user.vrange.volatile "$f" ""

echo
echo "# 6. regenerate: writing the pages makes them data again"
step dd if="$copy" of="$f" bs=4096 conv=notrunc status=none || fail "dd rewrite"
step getfattr --absolute-names -n user.vrange.purged "$f" || fail "getfattr purged"
expect user.vrange.purged "$f" ""
step cmp "$copy" "$f" || fail "the rewritten file differs"
echo
echo "OK: every step behaved as documented"
