#!/bin/bash
# usage: churn.sh REPS FILE_MIB CYCLES: base vs new vrangefs (alternating) + tmpfs; MB/s of write+rm cycles
REPS=$1; MIB=$2; CYC=$3
W=$(mktemp -d /tmp/dp-exp/m.XXXX); mkdir $W/b $W/n $W/t
mount -t tmpfs -o size=2G tmpfs $W/t
(cd /tmp/base-datapath && PYTHONPATH=/tmp/base-datapath .venv/bin/vrangefs mount $W/b --memory-cap 2G >/dev/null)
(cd /work/wt-datapath && PYTHONPATH=/work/wt-datapath .venv/bin/vrangefs mount $W/n --memory-cap 2G >/dev/null)
run() { s=$(date +%s.%N); for i in $(seq $CYC); do dd if=/dev/zero of=$1/f$i bs=1M count=$MIB 2>/dev/null; rm $1/f$i; done; e=$(date +%s.%N); echo "$CYC*$MIB*1.048576/($e-$s)" | bc -l | cut -c1-6; }
for fs in b n t; do run $W/$fs >/dev/null; done  # warm-up
for rep in $(seq $REPS); do echo "rep=$rep base=$(run $W/b) new=$(run $W/n) tmpfs=$(run $W/t) load=$(cut -d' ' -f1 /proc/loadavg)"; done
getfattr -n user.vrange.stats --only-values $W/n 2>/dev/null | grep -E "page_pool|daemon_rss"
getfattr -n user.vrange.stats --only-values $W/b 2>/dev/null | grep -E "daemon_rss"
umount $W/t; (cd /work/wt-datapath && .venv/bin/vrangefs umount $W/n); (cd /tmp/base-datapath && .venv/bin/vrangefs umount $W/b)
sleep 0.3; grep $W /proc/mounts; rm -rf $W
