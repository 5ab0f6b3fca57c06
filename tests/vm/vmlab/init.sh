#!/bin/busybox sh
# PID 1 of the VM lab's guest (tests/vm/README.md), in two stages:
#   stage 1, from the initramfs: load the modules listed in /etc/vmlab/modules.list (in
#     dependency order), mount the host's root read-only over 9p under a tmpfs overlay,
#     mount the results share, then switch_root into the overlay;
#   stage 2 (`init stage2`), still PID 1, in that root: the mounts a system has, the
#     kernel's modules at /lib/modules/<release>, lo, open-iscsi's initiator name, bcc for
#     the venv, then the job ($R/job.sh, written by the host). Its exit status leaves
#     through QEMU's isa-debug-exit port (QEMU exits with (status << 1) | 1).
# Neither stage returns: PID 1 exiting would panic the kernel.
# shellcheck shell=dash

LAB_FAILED=120    # the guest could not be set up (pytest's own codes are 0-5)
KERNEL_LOG_FAILED=121  # the tests passed, but the kernel logged a BUG/Oops/WARNING/panic
# What in the kernel's log fails the run (vmlab/kernlog.py BAD: keep the two in step).
KERNEL_BAD='BUG: |Oops|WARNING: CPU|------------\[ cut here \]|Kernel panic|general protection fault|Call Trace:'
HOST_ROOT_TAG=hostroot
RESULTS_TAG=results
NINEP_OPTS=trans=virtio,version=9p2000.L,msize=512000

BB=/bin/busybox
V=/run/vmlab            # stage 2's own tmpfs: busybox, this script, the module reports
R=$V/results            # the host's run directory, writable

say() {
    echo "vmlab: $*"
}

uptime_s() {
    read -r up _ < /proc/uptime
    echo "$up"
}

# The exit status to the host. isa-debug-exit takes one byte: above 127 we send 127 and
# the host reads the real one from $R/status.
power_off() {
    code=$1
    case $code in ''|*[!0-9]*) code=$LAB_FAILED ;; esac
    [ "$code" -gt 127 ] && code=127
    $BB sync
    # The inner printf makes the escape text (\NNN); the outer one turns it into the byte.
    # shellcheck disable=SC2059
    printf "$(printf '\\%03o' "$code")" | $BB dd of=/dev/port bs=1 seek=244 count=1 2>/dev/null
    # Still here: no isa-debug-exit (QEMU started by hand). Power off the plain way.
    $BB poweroff -f
    while :; do $BB sleep 60; done
}

fail() {
    say "FAILED: $*"
    power_off "$LAB_FAILED"
}

stage1() {
    $BB mkdir -p /proc /sys /dev /lower /rw /newroot /bin
    $BB mount -t proc proc /proc
    $BB mount -t sysfs sysfs /sys
    $BB mount -t devtmpfs devtmpfs /dev
    $BB --install -s /bin
    say "stage 1: kernel $(uname -r) up after $(uptime_s) s"

    loaded=0
    : > /etc/vmlab/modules.failed
    while read -r rel; do
        name=${rel##*/}
        name=${name%.ko}
        if out=$(insmod "/modules/$rel" 2>&1); then
            loaded=$((loaded + 1))
        else
            echo "$name: $out" >> /etc/vmlab/modules.failed
        fi
    done < /etc/vmlab/modules.list
    say "$loaded modules loaded"
    while read -r line; do say "module failed to load: $line"; done < /etc/vmlab/modules.failed
    while read -r name; do say "module absent from this kernel: $name"; done \
        < /etc/vmlab/modules.absent
    while read -r name; do
        [ -d "/sys/module/$name" ] || fail "module $name is needed to boot and did not load"
    done < /etc/vmlab/modules.critical

    mount -t 9p -o "$NINEP_OPTS,ro,cache=loose" "$HOST_ROOT_TAG" /lower \
        || fail "cannot mount the host's root (9p tag $HOST_ROOT_TAG)"
    mount -t tmpfs -o mode=0755 tmpfs /rw || fail "cannot mount the overlay's tmpfs"
    mkdir -p /rw/upper /rw/work
    mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work overlay /newroot \
        || fail "cannot mount the overlay on the host's root"
    mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /newroot/run || fail "cannot mount /run"
    mkdir -p "/newroot$R"
    # cache=none: every write reaches the host at once, even if the guest dies after.
    mount -t 9p -o "$NINEP_OPTS,cache=none" "$RESULTS_TAG" "/newroot$R" \
        || fail "cannot mount the results share (9p tag $RESULTS_TAG)"
    cp /bin/busybox /init /etc/vmlab/modules.failed /etc/vmlab/modules.absent "/newroot$V/"
    for dir in dev proc sys; do
        mount --move "/$dir" "/newroot/$dir" || fail "cannot move /$dir into the new root"
    done
    exec switch_root /newroot "$V/busybox" sh "$V/init" stage2
}

stage2() {
    BB=$V/busybox
    export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
    [ -r "$R/job.env" ] || fail "no $R/job.env from the host"
    # VMLAB_RELEASE, VMLAB_MODULES, VMLAB_REPO, VMLAB_TIMEOUT, VMLAB_INTERACTIVE
    # shellcheck source=/dev/null  # written by the host at run time
    . "$R/job.env"
    cp "$V/modules.failed" "$V/modules.absent" "$R/" 2>/dev/null

    $BB mkdir -p /dev/pts /dev/shm /run/lock
    $BB mount -t devpts -o gid=5,mode=0620,ptmxmode=0666 devpts /dev/pts
    $BB mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /dev/shm
    case "$VMLAB_REPO/" in
    /tmp/*)
        # The checkout lives under /tmp (a CI clone may): keep it in sight under the
        # guest's own /tmp, read-only as the rest of the host.
        $BB mkdir -p "$V/hosttmp"
        $BB mount --bind /tmp "$V/hosttmp" || fail "cannot keep the host's /tmp in sight"
        $BB mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp
        $BB mkdir -p "$VMLAB_REPO"
        $BB mount --bind "$V/hosttmp${VMLAB_REPO#/tmp}" "$VMLAB_REPO" \
            || fail "cannot bind the checkout $VMLAB_REPO under the guest's /tmp"
        ;;
    *)
        $BB mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp
        ;;
    esac
    $BB mount -t debugfs debugfs /sys/kernel/debug
    $BB mount -t tracefs tracefs /sys/kernel/tracing
    $BB mount -t bpf bpf /sys/fs/bpf
    [ -d /sys/fs/fuse/connections ] && $BB mount -t fusectl fusectl /sys/fs/fuse/connections
    [ -d /sys/kernel/config ] && $BB mount -t configfs configfs /sys/kernel/config

    # The kernel's own modules (modprobe, the kernel's request_module) and its headers
    # (bcc compiles against /lib/modules/<release>/build, as Debian's headers link it).
    # The links land in the overlay's tmpfs, never in the host's cache.
    moddir=/lib/modules/$VMLAB_RELEASE
    $BB mkdir -p "$moddir"
    $BB mount --bind "$VMLAB_MODULES" "$moddir" || fail "cannot bind $VMLAB_MODULES"
    $BB ln -sfn "/usr/src/linux-headers-$VMLAB_RELEASE" "$moddir/build"
    $BB ln -sfn "/usr/src/linux-headers-${VMLAB_RELEASE%-*}-common" "$moddir/source"

    $BB hostname vmlab
    $BB ip link set lo up || fail "cannot bring lo up"
    $BB mkdir -p /etc/iscsi
    suffix=$($BB od -An -tx1 -N6 /dev/urandom | $BB tr -d ' \n')
    echo "InitiatorName=iqn.1993-08.org.debian:01:vmlab$suffix" > /etc/iscsi/initiatorname.iscsi

    # Debian's bcc (python3-bpfcc) lives in the system's dist-packages, which the venv
    # does not see. A .pth in the venv (written in the overlay, so only for this guest)
    # adds a folder holding bcc alone: nothing else of dist-packages can shadow the venv.
    if [ -d /usr/lib/python3/dist-packages/bcc ]; then
        $BB mkdir -p "$V/pylib"
        $BB ln -sfn /usr/lib/python3/dist-packages/bcc "$V/pylib/bcc"
        for site in "$VMLAB_REPO"/.venv/lib/python3*/site-packages; do
            [ -d "$site" ] && echo "$V/pylib" > "$site/vmlab-bcc.pth"
        done
    fi

    say "stage 2: root ready after $(uptime_s) s; running the job"
    cd "$VMLAB_REPO" || fail "no $VMLAB_REPO in the guest"
    # The job gets a session of its own (util-linux setsid -w waits and returns its
    # status; busybox's cannot): a process in it that signals its whole group (iscsid
    # does at SIGTERM) then cannot take this script's bookkeeping down with it.
    if [ "${VMLAB_INTERACTIVE:-0}" = 1 ]; then
        # A shell on the serial line, with job control (-c: ttyS0 is its terminal).
        /usr/bin/setsid -w -c /bin/sh "$R/job.sh" < /dev/ttyS0 > /dev/ttyS0 2>&1
        status=$?
    else
        set -o pipefail
        /usr/bin/setsid -w "$BB" timeout -s TERM "$VMLAB_TIMEOUT" /bin/sh "$R/job.sh" \
            < /dev/null 2>&1 | $BB tee "$R/pytest.log"
        status=$?
        set +o pipefail
    fi
    say "job exited with status ${status:-?} at $(uptime_s) s"
    # Every run ends by reading the kernel's log: a BUG, Oops, WARNING or panic fails
    # it, whatever the tests said.
    $BB dmesg > "$R/dmesg.txt"
    if $BB grep -E "$KERNEL_BAD" "$R/dmesg.txt" > "$R/kernel-problems.txt"; then
        say "FAILED: the kernel logged a BUG, Oops, WARNING, panic or Call Trace:"
        while IFS= read -r line; do say "kernel| $line"; done < "$R/kernel-problems.txt"
        [ "${status:-1}" = 0 ] && status=$KERNEL_LOG_FAILED
    else
        $BB rm -f "$R/kernel-problems.txt"
        say "kernel log clean (no BUG, Oops, WARNING, panic or Call Trace)"
    fi
    echo "$status" > "$R/status"
    cat /proc/modules > "$R/modules.txt"
    $BB sync
    power_off "${status:-$LAB_FAILED}"
}

if [ "${1:-}" = stage2 ]; then
    stage2
else
    stage1
fi
fail "init fell through"
