"""The guest suite: runs inside the VM lab, on Debian's stock kernel (tests/vm/README.md)."""
