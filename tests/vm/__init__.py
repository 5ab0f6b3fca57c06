"""The QEMU VM lab: a real Debian kernel for the kernel path (see tests/vm/README.md)."""
