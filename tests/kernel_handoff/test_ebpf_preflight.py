"""The observer's one-line answers when bcc, headers, kprobes, the module or root are missing.

Machines are real directory trees (a sysfs, /lib/modules, /proc/self/status and kallsyms
laid out in tmp_path); the not-root and missing-bcc cases run real processes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kernel_handoff.ebpf.preflight import Machine, ObserverUnavailable, check, problems

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
RELEASE = "6.1.0-99-amd64"
DEBIAN_BCC = Path("/usr/lib/python3/dist-packages/bcc")
# Runs the real CLI entry point; registers `trace` if cli.py does not (yet).
RUN_TRACE = ("import sys; from iscsi_handoff.cli import cli, main; "
             "from iscsi_handoff import cli_trace; "
             "'trace' in cli.commands or cli_trace.register(cli); sys.argv[0] = 'iscsi-handoff'; "
             "main()")


def machine(tmp_path: Path, *, headers: bool = True, kprobes: bool = True,
            module: bool = True, caps: int = 0x1FFFFFFFFFF, bcc: bool = True) -> Machine:
    modules = tmp_path / "lib" / "modules"
    sys_ = tmp_path / "sys"
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "status").write_text(f"Name:\tpython\nCapEff:\t{caps:016x}\n")
    kallsyms = ["ffffffff81000000 T _stext"]
    if module:
        kallsyms.append("ffffffffc0a01230 t iscsi_if_rx\t[scsi_transport_iscsi]")
    (proc / "kallsyms").write_text("\n".join(kallsyms) + "\n")
    if headers:
        (modules / RELEASE / "build" / "include").mkdir(parents=True)
    if kprobes:
        (sys_ / "bus" / "event_source" / "devices" / "kprobe").mkdir(parents=True)
    sys_.mkdir(exist_ok=True)
    bcc_dir = tmp_path / "dist-packages"
    (bcc_dir / ("bcc" if bcc else "other")).mkdir(parents=True)
    if bcc:
        (bcc_dir / "bcc" / "__init__.py").write_text("")
    return Machine(release=RELEASE, modules_dir=modules, sys_dir=sys_, proc_dir=proc,
                   bcc_dirs=[str(bcc_dir)])


def test_all_there(tmp_path: Path) -> None:
    check(machine(tmp_path))


def test_headers_missing(tmp_path: Path) -> None:
    (line,) = problems(machine(tmp_path, headers=False))
    assert f"apt install linux-headers-{RELEASE}" in line
    assert f"lib/modules/{RELEASE}/build" in line


def test_kheaders_archive_is_enough(tmp_path: Path) -> None:
    m = machine(tmp_path, headers=False)
    (m.sys_dir / "kernel").mkdir()
    (m.sys_dir / "kernel" / "kheaders.tar.xz").write_bytes(b"")
    assert problems(m) == []


def test_kprobes_missing(tmp_path: Path) -> None:
    (line,) = problems(machine(tmp_path, kprobes=False))
    assert "no kprobes" in line and "CONFIG_KPROBES" in line


def test_tracefs_kprobe_events_is_enough(tmp_path: Path) -> None:
    m = machine(tmp_path, kprobes=False)
    (m.sys_dir / "kernel" / "tracing").mkdir(parents=True)
    (m.sys_dir / "kernel" / "tracing" / "kprobe_events").write_text("")
    assert problems(m) == []


def test_module_not_loaded(tmp_path: Path) -> None:
    (line,) = problems(machine(tmp_path, module=False))
    assert "modprobe iscsi_tcp" in line


def test_not_root(tmp_path: Path) -> None:
    (line,) = problems(machine(tmp_path, caps=0))
    assert line.startswith("not root") and "sudo" in line


def test_cap_bpf_with_perfmon_is_enough(tmp_path: Path) -> None:
    assert problems(machine(tmp_path, caps=(1 << 39) | (1 << 38))) == []
    assert problems(machine(tmp_path / "b", caps=1 << 39))[0].startswith("not root")


def test_everything_missing_is_one_line(tmp_path: Path) -> None:
    m = machine(tmp_path, headers=False, kprobes=False, caps=0, bcc=False)
    with pytest.raises(ObserverUnavailable) as info:
        check(m)
    text = str(info.value)
    assert "\n" not in text
    for needle in ("not root", "apt install python3-bpfcc", "apt install linux-headers-",
                   "no kprobes"):
        assert needle in text
    assert info.value.exit_code == 9


def _run(code: str, *, user: str | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [PY, "-c", code]
    if user is not None:
        setpriv = shutil.which("setpriv")
        if setpriv is None or os.geteuid() != 0:
            pytest.skip("needs root and setpriv (util-linux) to run as another user")
        cmd = [setpriv, f"--reuid={user}", "--regid=65534", "--clear-groups", *cmd]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=ROOT, env=env,
                          check=False)


def test_bcc_missing_message() -> None:
    done = _run("from kernel_handoff.ebpf.preflight import import_bcc\n"
                "try:\n    import_bcc(['/nonexistent'])\n"
                "except Exception as e:\n    print(type(e).__name__, e)")
    assert done.stdout.strip() == (
        "ObserverUnavailable bcc is not installed: apt install python3-bpfcc"), done.stderr


def test_venv_reaches_debian_bcc() -> None:
    if not (DEBIAN_BCC / "__init__.py").exists():
        pytest.skip("python3-bpfcc not installed (./scripts/setup installs it)")
    done = _run("import sys\nfrom kernel_handoff.ebpf.preflight import import_bcc\n"
                "bcc = import_bcc()\nprint(bcc.__file__, hasattr(bcc, 'BPF'))\n"
                "print(any('dist-packages' in p for p in sys.path))")
    assert done.returncode == 0, done.stderr
    first, second = done.stdout.splitlines()
    assert first == f"{DEBIAN_BCC / '__init__.py'} True"
    assert second == "False"  # bcc alone: the rest of dist-packages stays out of sight


def test_nothing_imports_bcc_until_asked() -> None:
    done = _run("import sys\nimport iscsi_handoff.cli, iscsi_handoff.cli_trace\n"
                "import kernel_handoff.ebpf.observer\nprint('bcc' in sys.modules)")
    assert done.stdout.strip() == "False", done.stderr


def test_trace_as_a_user_says_not_root() -> None:
    done = _run(RUN_TRACE.replace("main()", "sys.argv[1:] = ['trace']; main()"),
                user="nobody")
    assert done.returncode == 9, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("iscsi-handoff: cannot trace: not root")
    assert done.stdout == ""
