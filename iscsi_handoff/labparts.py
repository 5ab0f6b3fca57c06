"""What the tgt and LIO labs (tgtlab.py, liolab.py) share: a free port, where LUN files
go, a sparse LUN file, and the libiscsi URL for a LUN."""

from __future__ import annotations

import os
import socket
from pathlib import Path


def free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def shm_dir() -> str | None:
    """/dev/shm when writable (LUN files in memory), else the default temp folder."""
    return "/dev/shm" if os.access("/dev/shm", os.W_OK) else None


def new_sparse_file(path: Path, size: int) -> None:
    """Create `path` (it must not exist), private to its owner, `size` bytes, sparse."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, size)
    except BaseException:
        path.unlink(missing_ok=True)  # no half-made LUN file left behind
        raise
    finally:
        os.close(fd)


def libiscsi_url(portal: str, iqn: str, lun: int | None, chap: tuple[str, str] | None,
                 mutual: tuple[str, str] | None) -> str:
    """iscsi://[user%secret@]portal/iqn/lun[?target_user=..&target_password=..].

    libiscsi splits user and secret at `%`: neither may contain `%`, `@` or `/`.
    """
    creds = f"{chap[0]}%{chap[1]}@" if chap else ""
    url = f"iscsi://{creds}{portal}/{iqn}/{'' if lun is None else lun}"
    if mutual:
        url += f"?target_user={mutual[0]}&target_password={mutual[1]}"
    return url
