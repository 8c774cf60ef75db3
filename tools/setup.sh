#!/bin/sh
# Install everything vrangefs needs on a fresh Debian 12 machine (as root) into ./.venv, and
# its manual pages and user reference under /usr/local/share. Safe to run again.
set -eu
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# redis-server: the cache store's fleet tier (tests and demo start their own on loopback).
# inotify-tools: the cache-directory tests watch evictions with inotifywait.
# ccache: the cache-directory demo runs it unmodified.
apt-get install -y -qq fuse3 libfuse3-dev pkg-config attr gcc python3-dev python3-venv \
    git sqlite3 util-linux man-db redis-server inotify-tools ccache >/dev/null
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[test,bench,fleet]'
# mount(8) runs /sbin/mount.<type>; the systemd units run /usr/local/bin/vrangefs.
ln -sf "$(pwd)/.venv/bin/mount.vrangefs" /sbin/mount.vrangefs
ln -sf "$(pwd)/.venv/bin/vrangefs" /usr/local/bin/vrangefs
# Manual pages, generated from the argparse definitions by argparse-manpage.
.venv/bin/python tools/build_man.py build/man >/dev/null
install -D -m 644 build/man/vrangefs.1 /usr/local/share/man/man1/vrangefs.1
install -D -m 644 build/man/mount.vrangefs.8 /usr/local/share/man/man8/mount.vrangefs.8
man -w vrangefs >/dev/null
man -w 8 mount.vrangefs >/dev/null
# The user reference, where the man pages and the systemd units point.
doc=/usr/local/share/doc/vrangefs
install -d "$doc/docs"
install -m 644 README.md "$doc/README.md"
install -m 644 docs/*.md "$doc/docs/"
echo "vrangefs: set up in $(pwd)/.venv (vrangefs and mount.vrangefs linked into the PATH;" \
    "man vrangefs, man 8 mount.vrangefs; reference in $doc)"
