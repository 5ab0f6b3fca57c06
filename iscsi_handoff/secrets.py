"""Where CHAP secrets come from: a private file, an environment variable, or a prompt.

Never from a command-line value: argv is visible to every user through `ps`.
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Callable
from pathlib import Path

from userland.errors import ConfigError
from userland.login.chap import Credentials, Secret


def read_secret_file(path: Path) -> Secret:
    try:
        st = path.stat()
        if st.st_mode & (stat.S_IRGRP | stat.S_IROTH):
            raise ConfigError(f"secret file {path} is readable by group or others "
                              f"(mode {stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {path}")
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"secret file {path} is not a regular file")
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read secret file {path}: {exc.strerror}") from None
    value = raw.rstrip(b"\r\n")
    if not value:
        raise ConfigError(f"secret file {path} is empty")
    return Secret(value)


def read_secret_env(name: str) -> Secret:
    value = os.environ.get(name)
    if not value:
        raise ConfigError(f"environment variable {name} is unset or empty")
    return Secret(value.encode())


def load_credentials(user: str | None, secret_file: Path | None, secret_env: str | None, *,
                     label: str, option: str,
                     prompt: Callable[[str], str] | None = None) -> Credentials | None:
    """Credentials from the options of one side (``label``: "CHAP" or "mutual CHAP")."""
    if user is None:
        if secret_file is not None or secret_env is not None:
            raise ConfigError(f"a {label} secret was given without --{option}-user")
        return None
    if secret_file is not None and secret_env is not None:
        raise ConfigError(f"give the {label} secret once: --{option}-secret-file or "
                          f"--{option}-secret-env, not both")
    if secret_file is not None:
        secret = read_secret_file(secret_file)
    elif secret_env is not None:
        secret = read_secret_env(secret_env)
    elif prompt is not None and sys.stdin.isatty():
        text = prompt(f"{label} secret for {user}")
        if not text:
            raise ConfigError(f"empty {label} secret")
        secret = Secret(text.encode())
    else:
        raise ConfigError(f"--{option}-user needs a secret: --{option}-secret-file FILE "
                          f"(mode 600) or --{option}-secret-env VAR")
    return Credentials(user, secret)
