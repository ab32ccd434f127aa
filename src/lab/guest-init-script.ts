/**
 * The guest's /init (busybox sh), generated here so the workload and the lines the host parses are defined
 * in one place. Kernel command-line knobs (all optional):
 *   lab.rate=MiB/s (default 4)  lab.bs=KiB per write (64)  lab.secs=stop after N s (0 = until STOP)
 *   lab.direct=1 (O_DIRECT writes)  lab.md5=1 (md5 of the whole disk after the workload)
 * Console protocol on ttyS0, one line each (parsed by guest-console.ts):
 *   LAB: WORKLOAD_START uptime=U rate=R bs=B nblk=N direct=D
 *   LAB: HB t=U w=WRITES mib=MIB behind=B maxlat_cs=L errs=E       once a second
 *   LAB: WORKLOAD_STOP w=WRITES mib=MIB errs=E
 *   LAB: MD5 <hex>
 *   LAB: POWEROFF
 * Control on ttyS1 (a host unix socket): a line "STOP" ends the workload.
 */
export const guestLinePrefix = 'LAB:';

export function guestInitScript(modules: readonly string[]): string {
  return `#!/bin/busybox sh
/bin/busybox --install -s
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in ${modules.join(' ')}; do
  insmod /lib/modules/$m.ko || echo "${guestLinePrefix} insmod $m failed"
done
# A guest-agent channel (virtio-serial port org.qemu.guest_agent.0): keep its guest side open (fd 7), so the host
# sees the port connected. The guest runs no agent; a host-side one may stand in behind the channel.
if grep -qs 0x0003 /sys/bus/virtio/devices/*/device; then i=0
  while [ $i -lt 200 ]; do for p in /sys/class/virtio-ports/vport*; do
    [ "$(cat $p/name 2>/dev/null)" = org.qemu.guest_agent.0 ] && [ -c /dev/\${p##*/} ] && { exec 7<>/dev/\${p##*/}; i=999; }; done
    [ $i -lt 999 ] && { usleep 10000; i=$((i+1)); }; done; fi
RATE=4; BS=64; SECS=0; DIRECT=1; MD5=1; DEV=/dev/vda
for a in $(cat /proc/cmdline); do case "$a" in
  lab.rate=*) RATE=\${a#*=};; lab.bs=*) BS=\${a#*=};; lab.secs=*) SECS=\${a#*=};;
  lab.direct=*) DIRECT=\${a#*=};; lab.md5=*) MD5=\${a#*=};; esac; done
i=0; while [ ! -b $DEV ] && [ $i -lt 500 ]; do usleep 10000; i=$((i+1)); done
[ -b $DEV ] || { echo "${guestLinePrefix} FATAL no $DEV"; poweroff -f; }
NBLK=$(( $(cat /sys/block/vda/size) * 512 / (BS*1024) ))
OFLAG=""; [ "$DIRECT" = 1 ] && OFLAG="oflag=direct"
if [ -c /dev/ttyS1 ]; then stty -F /dev/ttyS1 -echo 2>/dev/null
  ( while read -r c < /dev/ttyS1; do echo "$c" >> /tmp/ctl; done ) & fi
# centiseconds since boot from /proc/uptime ("12.34 ..."); the leading 1 keeps "05" from reading as octal
cs() { read up idle < /proc/uptime; now=$(( \${up%.*}*100 + 1\${up#*.} - 100 )); }
cs; start=$now; hb=$now; w=0; errs=0; maxlat=0
echo "${guestLinePrefix} WORKLOAD_START uptime=$up rate=$RATE bs=$BS nblk=$NBLK direct=$DIRECT"
while :; do
  cs; el=$((now-start))
  if [ $w -lt $(( el*RATE*1024/BS/100 )) ]; then
    off=$(( (RANDOM*32768+RANDOM) % NBLK )); t0=$now
    dd if=/dev/urandom of=$DEV bs=\${BS}k count=1 seek=$off conv=notrunc $OFLAG 2>/dev/null || errs=$((errs+1))
    w=$((w+1)); cs; lat=$((now-t0)); [ $lat -gt $maxlat ] && maxlat=$lat
  else usleep 10000; fi
  if [ $((now-hb)) -ge 100 ]; then
    echo "${guestLinePrefix} HB t=$up w=$w mib=$((w*BS/1024)) behind=$(( el*RATE*1024/BS/100 - w )) maxlat_cs=$maxlat errs=$errs"
    hb=$now; maxlat=0
    [ -f /tmp/ctl ] && grep -q STOP /tmp/ctl && break
    [ "$SECS" -gt 0 ] && [ $el -ge $((SECS*100)) ] && break
  fi
done
sync; echo "${guestLinePrefix} WORKLOAD_STOP w=$w mib=$((w*BS/1024)) errs=$errs"
if [ "$MD5" = 1 ]; then echo 3 > /proc/sys/vm/drop_caches; s=$(md5sum $DEV); echo "${guestLinePrefix} MD5 \${s%% *}"; fi
echo "${guestLinePrefix} POWEROFF"; poweroff -f
`;
}
