"""Where a detached keeper's log lines go: its stderr is /dev/null.

syslog (the journal on systemd machines) through /dev/log when there is one, else a file
in the run dir; every line with a timestamp and the keeper's pid. Progress (logins,
recoveries, stops) is logged at INFO, so the detached keeper logs at INFO.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
from pathlib import Path

from iscsi_handoff import registry

DEV_LOG = "/dev/log"


def log_file() -> Path:
    return registry.run_dir() / "iscsi-handoff.log"


def log_detached() -> str:
    """Send the iscsi_handoff loggers to syslog (or the file); returns where."""
    logger = logging.getLogger("iscsi_handoff")
    before = logger.getEffectiveLevel()
    for existing in logging.getLogger().handlers:  # the terminal, until ready(): as before
        if existing.level == logging.NOTSET:
            existing.setLevel(before)
    logger.setLevel(min(before, logging.INFO))
    handler: logging.Handler
    if os.path.exists(DEV_LOG):
        try:
            handler = logging.handlers.SysLogHandler(
                address=DEV_LOG, facility=logging.handlers.SysLogHandler.LOG_DAEMON)
            handler.setFormatter(logging.Formatter(
                "iscsi-handoff[%(process)d]: %(levelname)s %(message)s"))
            logger.addHandler(handler)
            return DEV_LOG
        except OSError:
            pass  # a /dev/log nobody listens on: the file below
    path = log_file()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(
        "%(asctime)s iscsi-handoff[%(process)d]: %(levelname)s %(message)s"))
    logger.addHandler(handler)
    return str(path)
