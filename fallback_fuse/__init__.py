"""The FUSE fallback: each disk LUN a regular file, as the NetBSD userland initiator did.

``device`` is the interface a session implements; ``storage`` turns byte ranges into
block I/O; ``tree`` and ``ops`` are the file system; ``mount`` serves it under trio;
``loop`` attaches a storage file to a loop device.
"""
