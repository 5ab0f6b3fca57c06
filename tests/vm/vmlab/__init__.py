"""Boot Debian's stock kernel in QEMU (TCG) on the host's root, read-only, and run the
guest suite (tests/vm/guest) inside it. Host side only: nothing here runs in the guest
except init.sh.

- kernel.py     resolve, download, extract and depmod the stock kernel (cached)
- modules.py    which modules the guest loads, in dependency order (modules.dep)
- initramfs.py  the busybox initramfs carrying init.sh and those modules (cached)
- init.sh       the guest's PID 1: mounts, modules, then the job; exit status to QEMU
- boot.py       one QEMU run: command line, hard timeout, console, results
- __main__.py   the developer entry point behind scripts/vm/run
"""
