#!/bin/sh
# Install everything vrangefs needs on a fresh Debian 12 machine (as root) into ./.venv.
set -eu
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq fuse3 libfuse3-dev pkg-config attr gcc python3-dev python3-venv \
    git sqlite3 util-linux >/dev/null
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[test,bench]'
# mount(8) runs /sbin/mount.<type>; the systemd units run /usr/local/bin/vrangefs.
ln -sf "$(pwd)/.venv/bin/mount.vrangefs" /sbin/mount.vrangefs
ln -sf "$(pwd)/.venv/bin/vrangefs" /usr/local/bin/vrangefs
echo "vrangefs: set up in $(pwd)/.venv (vrangefs and mount.vrangefs linked into the PATH)"
