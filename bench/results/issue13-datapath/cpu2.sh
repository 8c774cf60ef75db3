#!/bin/bash
# usage: cpu2.sh REPS: base vs new daemons, daemon CPU (us/MiB) and wall MB/s per phase, alternating
REPS=$1
W=$(mktemp -d /tmp/dp-exp/m.XXXX); mkdir $W/b $W/n
(cd /tmp/base-datapath && PYTHONPATH=/tmp/base-datapath .venv/bin/vrangefs mount $W/b --memory-cap 2G >/dev/null 2>&1)
(cd /work/wt-datapath && PYTHONPATH=/work/wt-datapath .venv/bin/vrangefs mount $W/n --memory-cap 2G >/dev/null 2>&1)
pidof_() { getfattr -n user.vrange.stats --only-values $1 2>/dev/null | sed -n 's/^pid=//p'; }
PB=$(pidof_ $W/b); PN=$(pidof_ $W/n)
cpu() { awk '{print $14+$15}' /proc/$1/stat; }
phase() { # pid cmd... -> "MBps/cpuus"
  local pid=$1; shift; c0=$(cpu $pid); s=$(date +%s.%N); "$@" 2>/dev/null; e=$(date +%s.%N); c1=$(cpu $pid)
  echo "$(echo "1073.741824/($e-$s)" | bc -l | cut -c1-5)/$(( (c1-c0)*10000/1024 ))"; }
for rep in $(seq $REPS); do
 for t in b n; do
  pid=$PB; [ $t = n ] && pid=$PN; f=$W/$t/f
  a=$(phase $pid dd if=/dev/zero of=$f bs=1M count=1024)
  o=$(phase $pid dd if=/dev/zero of=$f bs=1M count=1024 conv=notrunc)
  sync; echo 3 > /proc/sys/vm/drop_caches
  r=$(phase $pid dd if=$f of=/dev/null bs=1M)
  rm $f
  echo "rep=$rep $t fresh=$a over=$o cold=$r (MB/s / daemon us per MiB) load=$(cut -d' ' -f1 /proc/loadavg)"
 done
done
(cd /work/wt-datapath && .venv/bin/vrangefs umount $W/n); (cd /tmp/base-datapath && .venv/bin/vrangefs umount $W/b)
sleep 0.3; grep $W /proc/mounts; rm -rf $W
