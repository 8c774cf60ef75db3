#!/bin/bash
# usage: readexp.sh TREE REPS WINDOWS BGS
TREE=$1; REPS=${2:-3}; WINDOWS=${3:-"1024 2048 4096 8192"}; BGS=${4:-"12"}
cd $TREE; export PYTHONPATH=$TREE
W=$(mktemp -d /tmp/dp-exp/m.XXXX); mkdir $W/t $W/c $W/v
mount -t tmpfs -o size=2G tmpfs $W/t
setsid .venv/bin/python bench/ceiling.py $W/c --max-tasks=2147483647 >$W/c.log 2>&1 &
CP=$!
.venv/bin/vrangefs mount $W/v --memory-cap 2G
while ! mountpoint -q $W/c; do sleep 0.1; done
for fs in t c v; do dd if=/dev/zero of=$W/$fs/f bs=1M count=1024 2>/dev/null; done
dev() { printf "%d:%d" $((0x$(stat -c %t $1))) $((0x$(stat -c %T $1))); }
for fs in c v; do d=$(stat -c %d $W/$fs); echo "$fs dev $d $(mountpoint -d $W/$fs) ra=$(cat /sys/class/bdi/$(mountpoint -d $W/$fs)/read_ahead_kb)"; done
for rep in $(seq $REPS); do
 for bg in $BGS; do
  for win in $WINDOWS; do
   line="rep=$rep bg=$bg win=$win"
   for fs in t c v; do
     if [ $fs != t ]; then md=$(mountpoint -d $W/$fs); echo $win > /sys/class/bdi/$md/read_ahead_kb; cn=${md#0:}; echo $bg > /sys/fs/fuse/connections/$cn/max_background; echo $((bg*3/4)) > /sys/fs/fuse/connections/$cn/congestion_threshold; fi
     sync; echo 3 > /proc/sys/vm/drop_caches
     s=$(date +%s.%N); dd if=$W/$fs/f of=/dev/null bs=1M 2>/dev/null; e=$(date +%s.%N)
     line="$line $fs=$(echo "1073.741824/($e-$s)" | bc -l | cut -c1-6)"
   done
   echo "$line load=$(cut -d' ' -f1 /proc/loadavg)"
  done
 done
done
umount $W/t; .venv/bin/vrangefs umount $W/v; kill $CP; wait $CP
sleep 0.5; grep $W /proc/mounts; rm -rf $W
