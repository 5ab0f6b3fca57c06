"""Create, show and delete LIO iSCSI targets through rtslib-fb, with no secret in argv.

Run by Debian's /usr/bin/python3, where python3-rtslib-fb lives (the venv cannot import
it), as ``scripts/lio-target`` or from iscsi_handoff/liolab.py. It imports only the
standard library and rtslib_fb, nothing of ours, so it also runs where the project is
not installed (the Vagrant target VM).

Why rtslib-fb and not targetcli: targetcli takes CHAP secrets as arguments
(``set auth password=...``), and argv is public (ps, /proc/PID/cmdline). rtslib-fb
writes them into configfs from this process; they come from a file (mode 600 or
stricter) or an environment variable, never from argv.

Every object made here is named from the target's IQN, so ``delete`` removes exactly
what ``create`` made, and never another target or backstore.

Exit codes follow the project's: 0 ok, 2 usage or configuration, 9 LIO unavailable on
this machine, 6 LIO refused the configuration.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EXIT_USAGE = 2
EXIT_REFUSED = 6
EXIT_UNAVAILABLE = 9
CONFIGFS = Path("/sys/kernel/config")
# target_core_file is loaded on demand by the kernel too, but only once a fileio HBA
# exists; loading it here makes a missing module fail early and by name.
MODULES = ("target_core_mod", "target_core_file", "iscsi_target_mod")
MODPROBE_TIMEOUT = 30.0
SECRET_MAX = 255  # rtslib-fb refuses longer values; LIO's own limit
TCP_LISTEN = "0A"


class LioError(Exception):
    """One line for the user, and the exit code."""

    def __init__(self, message: str, exit_code: int = EXIT_REFUSED) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class Spec:
    """What `create` makes: one target, one TPG, one portal, LUN n from luns[n]."""

    iqn: str
    host: str
    port: int
    luns: list[Path]
    acls: list[str] = field(default_factory=list)  # empty: any initiator (demo mode)
    chap: tuple[str, str] | None = None
    mutual: tuple[str, str] | None = None
    params: dict[str, str] = field(default_factory=dict)
    write_back: bool = False


# -- input --------------------------------------------------------------------------


def parse_portal(text: str) -> tuple[str, int]:
    """HOST:PORT or [V6]:PORT; the port is required (LIO's 3260 is often taken)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536 or not host:
        raise LioError(f"portal {text!r}: expected HOST:PORT", EXIT_USAGE)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise LioError(f"portal {text!r}: write IPv6 addresses as [ADDR]:PORT", EXIT_USAGE)
    return host, int(port)


def read_secret(what: str, path: str | None, env: str | None) -> str:
    """A secret from a private file or an environment variable, checked like the CLI's."""
    if (path is None) == (env is None):
        raise LioError(f"{what}: give exactly one of --{what}-secret-file or "
                       f"--{what}-secret-env", EXIT_USAGE)
    if env is not None:
        value = os.environ.get(env)
        if value is None:
            raise LioError(f"{what}: environment variable {env} is not set", EXIT_USAGE)
    else:
        assert path is not None
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError as exc:
            raise LioError(f"{what}: cannot open {path}: {exc.strerror}", EXIT_USAGE) from None
        with os.fdopen(fd, encoding="utf-8") as f:
            mode = os.fstat(f.fileno()).st_mode
            if not stat.S_ISREG(mode):
                raise LioError(f"{what}: {path} is not a regular file", EXIT_USAGE)
            if mode & 0o077:
                raise LioError(f"{what}: {path} is readable by others (mode "
                               f"{stat.S_IMODE(mode):o}); chmod 600 it", EXIT_USAGE)
            value = f.read()
        value = value.rstrip("\r\n")  # as iscsi_handoff/secrets.py: one file, both sides
    return check_secret(what, value)


def check_secret(what: str, value: object) -> str:
    # rtslib strips values and treats "NULL" as unset: refuse what it would change.
    if not isinstance(value, str) or not value or value != value.strip() or \
            value == "NULL" or len(value) > SECRET_MAX:
        raise LioError(f"{what}: the secret must be 1-{SECRET_MAX} characters without "
                       "leading or trailing spaces", EXIT_USAGE)
    return value


def check_pair(chap: tuple[str, str] | None, mutual: tuple[str, str] | None) -> None:
    if mutual is not None:
        if chap is None:
            raise LioError("mutual CHAP needs CHAP (the initiator's account) as well",
                           EXIT_USAGE)
        if mutual[1] == chap[1]:
            raise LioError("the mutual secret must differ from the initiator's "
                           "(RFC 7143 section 12.1.3)", EXIT_USAGE)


def backstore_name(iqn: str, lun: int) -> str:
    """The fileio backstore of LUN `lun`: named from the IQN, so delete finds it."""
    return f"ihlab_{hashlib.sha256(iqn.encode()).hexdigest()[:12]}_l{lun}"


# -- the kernel side ----------------------------------------------------------------


def _rtslib() -> Any:
    try:
        import rtslib_fb
    except ImportError as exc:
        raise LioError(f"rtslib_fb not importable by {sys.executable} ({exc}); install "
                       "Debian's python3-rtslib-fb", EXIT_UNAVAILABLE) from None
    return rtslib_fb


def _missing_modules() -> list[str]:
    return [m for m in MODULES if not (Path("/sys/module") / m).is_dir()]


def ensure_lio() -> str:
    """Load the target modules and mount configfs; one line saying what is there.

    modprobe only for what /sys/module lacks: the QEMU guest insmods the modules from
    its initramfs and has no /lib/modules tree for modprobe to read."""
    if os.geteuid() != 0:
        raise LioError("LIO needs root (configfs and modprobe)", EXIT_UNAVAILABLE)
    _rtslib()
    missing = _missing_modules()
    if missing:
        tool = shutil.which("modprobe") or "/sbin/modprobe"
        try:
            done = subprocess.run([tool, "-a", *missing], capture_output=True, text=True,
                                  timeout=MODPROBE_TIMEOUT, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise LioError(f"modprobe failed: {exc}", EXIT_UNAVAILABLE) from None
        if done.returncode != 0 or _missing_modules():
            why = next((ln.strip() for ln in done.stderr.splitlines() if ln.strip()),
                       f"exit status {done.returncode}")
            raise LioError(f"LIO modules missing on kernel {os.uname().release}: "
                           f"`modprobe -a {' '.join(missing)}`: {why}", EXIT_UNAVAILABLE)
    if CONFIGFS.is_dir() and not os.path.ismount(CONFIGFS):
        subprocess.run(["mount", "-t", "configfs", "none", str(CONFIGFS)],
                       capture_output=True, check=False, timeout=MODPROBE_TIMEOUT)
    version_file = CONFIGFS / "target" / "version"
    if not version_file.is_file():
        raise LioError(f"{CONFIGFS}/target missing although {', '.join(MODULES)} are "
                       "loaded (configfs not mounted?)", EXIT_UNAVAILABLE)
    return f"LIO ready on kernel {os.uname().release}: {version_file.read_text().strip()}"


def listening(port: int) -> bool:
    """Some socket listens on TCP `port` (LIO's are kernel sockets: no PID to match)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if len(cols) > 3 and cols[3] == TCP_LISTEN and \
                    int(cols[1].rsplit(":", 1)[1], 16) == port:
                return True
    return False


def _find_target(rts: Any, iqn: str) -> Any | None:
    for target in rts.RTSRoot().targets:
        if target.fabric_module.name == "iscsi" and target.wwn == iqn:
            return target
    return None


def _fresh_backstore(rts: Any, name: str, path: Path, write_back: bool) -> Any:
    """A fileio backstore `name` on `path`; a leftover of ours no LUN uses is replaced."""
    for so in rts.RTSRoot().storage_objects:
        if so.plugin == "fileio" and so.name == name:
            if list(so.attached_luns):
                raise LioError(f"backstore {name} exists and is in use (another target "
                               "with this IQN?)")
            so.delete()
    size = path.stat().st_size
    return rts.FileIOStorageObject(name, dev=str(path), size=size, write_back=write_back)


def create(spec: Spec) -> dict[str, Any]:
    """Make the target; on any failure remove what was made, then raise."""
    rts = _rtslib()
    ensure_lio()
    for n, path in enumerate(spec.luns):
        try:
            size = path.stat().st_size if path.is_file() else -1
        except OSError:
            size = -1
        if size <= 0 or size % 512:
            raise LioError(f"LUN {n}: {path} must be an existing file whose size is a "
                           "positive multiple of 512", EXIT_USAGE)
    if _find_target(rts, spec.iqn) is not None:
        raise LioError(f"LIO target {spec.iqn} already exists: not ours to change "
                       "(delete it first)")
    made: list[Any] = []
    target = None
    try:
        for n, path in enumerate(spec.luns):
            made.append(_fresh_backstore(rts, backstore_name(spec.iqn, n), path,
                                         spec.write_back))
        target = rts.Target(rts.FabricModule("iscsi"), spec.iqn, mode="create")
        tpg = rts.TPG(target, 1, mode="create")
        _configure_tpg(rts, tpg, spec, made)
        if not listening(spec.port):
            raise LioError(f"LIO accepted portal {spec.host}:{spec.port} but nothing "
                           "listens there")
    except BaseException as exc:
        if target is not None:
            _quietly(target.delete)
        for so in made:
            _quietly(so.delete)
        if isinstance(exc, LioError):
            raise
        if isinstance(exc, rts.RTSLibError | OSError):
            raise LioError(f"LIO refused target {spec.iqn}: {exc}") from None
        raise
    return describe(target)


def _configure_tpg(rts: Any, tpg: Any, spec: Spec, backstores: list[Any]) -> None:
    luns = [rts.LUN(tpg, n, so) for n, so in enumerate(backstores)]
    for key, value in spec.params.items():
        tpg.set_parameter(key, value)
    demo = not spec.acls
    tpg.set_attribute("authentication", "1" if spec.chap else "0")
    tpg.set_attribute("generate_node_acls", "1" if demo else "0")
    if demo:
        # Any initiator, read-write: demo mode write-protects unless told otherwise.
        tpg.set_attribute("demo_mode_write_protect", "0")
        tpg.set_attribute("cache_dynamic_acls", "1")
        if spec.chap:
            _set_chap(tpg, spec, where="the TPG (demo mode)")
    for initiator in spec.acls:
        acl = rts.NodeACL(tpg, initiator, mode="create")
        for lun in luns:
            rts.MappedLUN(acl, lun.lun, lun)
        if spec.chap:
            _set_chap(acl, spec, where=f"the ACL of {initiator}")
    rts.NetworkPortal(tpg, f"[{spec.host}]" if ":" in spec.host else spec.host, spec.port,
                      mode="create")
    tpg.enable = True


def _set_chap(node: Any, spec: Spec, *, where: str) -> None:
    assert spec.chap is not None
    node.chap_userid, node.chap_password = spec.chap
    if spec.mutual:
        node.chap_mutual_userid, node.chap_mutual_password = spec.mutual
    # rtslib ignores write failures of TPG-level auth (kernels without it): read back.
    if node.chap_userid != spec.chap[0] or \
            (spec.mutual and node.chap_mutual_userid != spec.mutual[0]):
        raise LioError(f"this kernel did not take CHAP credentials on {where}")


def delete(iqn: str) -> bool:
    """Delete the target (its sessions end) and our backstores; False if it was absent."""
    rts = _rtslib()
    ensure_lio()
    target = _find_target(rts, iqn)
    if target is not None:
        try:
            target.delete()
        except (rts.RTSLibError, OSError) as exc:
            raise LioError(f"LIO would not delete {iqn}: {exc}") from None
    prefix = backstore_name(iqn, 0)[:-1]
    for so in list(rts.RTSRoot().storage_objects):
        if so.plugin == "fileio" and so.name.startswith(prefix) and \
                so.name[len(prefix):].isdigit() and not list(so.attached_luns):
            try:
                so.delete()
            except (rts.RTSLibError, OSError) as exc:
                raise LioError(f"LIO would not delete backstore {so.name}: {exc}") from None
    return target is not None


def describe(target: Any) -> dict[str, Any]:
    """A target as JSON, without a single secret (user names only)."""
    tpgs = []
    for tpg in target.tpgs:
        tpgs.append({
            "tag": tpg.tag,
            "enabled": bool(tpg.enable),
            "authentication": tpg.get_attribute("authentication") == "1",
            "demo_mode": tpg.get_attribute("generate_node_acls") == "1",
            "chap_user": _optional(tpg, "chap_userid"),
            "mutual_user": _optional(tpg, "chap_mutual_userid"),
            "portals": [f"{p.ip_address}:{p.port}" for p in tpg.network_portals],
            "luns": [{"lun": lun.lun, "backstore": lun.storage_object.name,
                      "file": lun.storage_object.udev_path,
                      "size": lun.storage_object.size}
                     for lun in sorted(tpg.luns, key=lambda x: x.lun)],
            "acls": [{"initiator": acl.node_wwn,
                      "chap_user": _optional(acl, "chap_userid"),
                      "mutual_user": _optional(acl, "chap_mutual_userid"),
                      "mapped_luns": sorted(m.mapped_lun for m in acl.mapped_luns)}
                     for acl in tpg.node_acls],
        })
    return {"iqn": target.wwn, "tpgs": tpgs}


def _optional(node: Any, attr: str) -> str | None:
    value = getattr(node, attr, None)
    return value or None


def show(iqn: str | None) -> list[dict[str, Any]]:
    rts = _rtslib()
    ensure_lio()
    return [describe(t) for t in rts.FabricModule("iscsi").targets
            if iqn is None or t.wwn == iqn]


def _quietly(action: Any) -> None:
    try:
        action()
    except Exception as exc:  # cleanup after a failure: report, keep the first error
        print(f"lio-target: cleanup: {exc}", file=sys.stderr)


# -- the command line ---------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lio-target", allow_abbrev=False,
        description="LIO iSCSI targets for tests and labs, through rtslib-fb. "
                    "Secrets come from files (mode 600) or the environment, never argv.")
    sub = p.add_subparsers(dest="command", required=True)
    # No abbreviations: --chap-secret-f must not pass for --chap-secret-file.
    new = functools.partial(sub.add_parser, allow_abbrev=False)
    new("check", help="load the target modules, mount configfs, say so")
    c = new("create", help="a target with fileio LUNs 0..n-1 on one portal")
    c.add_argument("iqn")
    c.add_argument("--portal", required=True, metavar="HOST:PORT")
    c.add_argument("--lun", action="append", required=True, type=Path, metavar="FILE",
                   help="an existing file (size a multiple of 512); repeat for LUN 1, 2...")
    c.add_argument("--acl", action="append", default=[], metavar="INITIATOR_IQN",
                   help="allow this initiator (repeatable); none: any initiator")
    c.add_argument("--chap-user")
    c.add_argument("--chap-secret-file")
    c.add_argument("--chap-secret-env", metavar="VAR")
    c.add_argument("--mutual-user", help="the target's own CHAP name (mutual CHAP)")
    c.add_argument("--mutual-secret-file")
    c.add_argument("--mutual-secret-env", metavar="VAR")
    c.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="a TPG login parameter, e.g. HeaderDigest=CRC32C,None")
    c.add_argument("--write-back", action="store_true",
                   help="fileio write-back cache (default: write-through)")
    d = new("delete", help="delete the target and the backstores create made")
    d.add_argument("iqn")
    s = new("show", help="targets as JSON (user names, never secrets)")
    s.add_argument("iqn", nargs="?")
    new("serve", help="JSON requests on stdin, one a line (iscsi_handoff/liolab.py's way)")
    return p


def spec_from(args: argparse.Namespace) -> Spec:
    host, port = parse_portal(args.portal)
    chap = mutual = None
    if args.chap_user:
        chap = (args.chap_user, read_secret("chap", args.chap_secret_file,
                                            args.chap_secret_env))
    elif args.chap_secret_file or args.chap_secret_env:
        raise LioError("a CHAP secret without --chap-user", EXIT_USAGE)
    if args.mutual_user:
        if chap is None:
            raise LioError("mutual CHAP needs --chap-user as well", EXIT_USAGE)
        mutual = (args.mutual_user, read_secret("mutual", args.mutual_secret_file,
                                                args.mutual_secret_env))
        check_pair(chap, mutual)
    elif args.mutual_secret_file or args.mutual_secret_env:
        raise LioError("a mutual secret without --mutual-user", EXIT_USAGE)
    params = {}
    for item in args.param:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise LioError(f"--param {item!r}: expected KEY=VALUE", EXIT_USAGE)
        params[key] = value
    return Spec(iqn=args.iqn, host=host, port=port, luns=list(args.lun), acls=args.acl,
                chap=chap, mutual=mutual, params=params, write_back=args.write_back)


def spec_from_json(data: dict[str, Any]) -> Spec:
    """A `create` request of the serve protocol; the same checks as the command line's."""
    try:
        host, port = parse_portal(str(data["portal"]))
        chap = mutual = None
        if data.get("chap"):
            user, secret = data["chap"]
            chap = (str(user), check_secret("chap", secret))
        if data.get("mutual"):
            user, secret = data["mutual"]
            mutual = (str(user), check_secret("mutual", secret))
        check_pair(chap, mutual)
        return Spec(iqn=str(data["iqn"]), host=host, port=port,
                    luns=[Path(p) for p in data["luns"]],
                    acls=[str(a) for a in data.get("acls", [])], chap=chap, mutual=mutual,
                    params={str(k): str(v) for k, v in data.get("params", {}).items()},
                    write_back=bool(data.get("write_back", False)))
    except (KeyError, TypeError, ValueError) as exc:
        raise LioError(f"malformed create request ({type(exc).__name__})", EXIT_USAGE) from None


def serve() -> int:
    """Answer requests until stdin closes: one JSON object a line in, one a line out.

    iscsi_handoff/liolab.py keeps one such worker per process: in the QEMU guest a new
    Python and an rtslib import cost seconds per call. Secrets travel in the pipe, seen
    by the two processes only. Requests: {"op": "check"}, {"op": "create", "spec":
    {...}}, {"op": "delete", "iqn": IQN}, {"op": "show", "iqn": IQN or null}. Answers:
    {"ok": true, "result": ...} or {"ok": false, "error": LINE, "exit_code": N}."""
    answers = sys.stdout
    sys.stdout = sys.stderr  # a stray print must not break the protocol
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            request = json.loads(line)
            op = request.get("op") if isinstance(request, dict) else None
            if op == "check":
                result: Any = ensure_lio()
            elif op == "create":
                result = create(spec_from_json(request.get("spec") or {}))
            elif op == "delete":
                result = delete(str(request["iqn"]))
            elif op == "show":
                iqn = request.get("iqn")
                result = show(None if iqn is None else str(iqn))
            else:
                raise LioError(f"unknown request {op!r}", EXIT_USAGE)
            answer = {"ok": True, "result": result}
        except LioError as exc:
            answer = {"ok": False, "error": str(exc), "exit_code": exc.exit_code}
        except Exception as exc:  # a bug, or rtslib surprised: say so and keep serving
            answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "exit_code": 1}
        answers.write(json.dumps(answer) + "\n")
        answers.flush()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "serve":
        return serve()
    try:
        if args.command == "check":
            print(ensure_lio())
        elif args.command == "create":
            print(json.dumps(create(spec_from(args)), indent=2))
        elif args.command == "delete":
            print(f"deleted {args.iqn}" if delete(args.iqn) else f"no target {args.iqn}")
        else:
            print(json.dumps(show(args.iqn), indent=2))
    except LioError as exc:
        print(f"lio-target: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
