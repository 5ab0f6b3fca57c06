"""kernel_handoff.uevent against the kernel's own include/scsi/iscsi_if.h.

A small C program is generated from the header itself: every enumerator of the enums we
model (read out of the header text, so a constant we forgot shows up as missing), every
offset and size of the uevent fields our layout tables declare, and struct iscsi_stats.
gcc compiles it against Debian's linux-headers-*-common; its output is compared with the
Python constants. Then round trips of every request and event through the codec.
"""

from __future__ import annotations

import enum
import glob
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from kernel_handoff import uevent as ue
from kernel_handoff.uevent import (
    ConnErr,
    ConnState,
    Event,
    Param,
    Request,
    StopConn,
)

HEADER_GLOB = "/usr/src/linux-headers-*-common/include/scsi/iscsi_if.h"

# C enum -> (Python enum, C prefix). ISCSI_OK is iscsi_err's zero.
ENUMS: dict[str, tuple[type[enum.IntEnum], str]] = {
    "iscsi_err": (ConnErr, "ISCSI_ERR_"),
    "iscsi_param": (Param, "ISCSI_PARAM_"),
    "iscsi_conn_state": (ConnState, "ISCSI_CONN_STATE_"),
}
DEFINES = {
    "ISCSI_NL_GRP_ISCSID": ue.ISCSI_NL_GRP_ISCSID,
    "ISCSI_NL_GRP_UIP": ue.ISCSI_NL_GRP_UIP,
    "UEVENT_BASE": ue.UEVENT_BASE,
    "KEVENT_BASE": ue.KEVENT_BASE,
    "ISCSI_ERR_BASE": ue.ISCSI_ERR_BASE,
    "STOP_CONN_TERM": StopConn.TERM,
    "STOP_CONN_SUSPEND": StopConn.SUSPEND,
    "STOP_CONN_RECOVER": StopConn.RECOVER,
    "ISCSI_STATS_CUSTOM_MAX": ue.STATS_CUSTOM_MAX,
    "ISCSI_STATS_CUSTOM_DESC_MAX": ue.STATS_CUSTOM_DESC,
}
# Sentinels that grow when the kernel adds a value: not part of the interface.
SENTINELS = {"ISCSI_PARAM_MAX"}


def _find_header() -> Path | None:
    found = sorted(glob.glob(HEADER_GLOB), key=lambda p: [
        int(x) if x.isdigit() else x for x in re.split(r"(\d+)", p)])
    return Path(found[-1]) if found else None


def _enum_names(text: str, name: str) -> list[str]:
    """The enumerators of ``enum name { ... };`` in header text, comments stripped."""
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    m = re.search(r"enum\s+" + name + r"\s*\{(.*?)\};", text, flags=re.S)
    assert m, f"enum {name} not in the header"
    names = []
    for entry in m.group(1).split(","):
        entry = entry.strip()
        if entry:
            names.append(re.match(r"[A-Za-z_][A-Za-z0-9_]*", entry).group(0))  # type: ignore[union-attr]
    return names


def _python_name(c_name: str) -> tuple[type[enum.IntEnum], str]:
    if c_name == "ISCSI_OK":
        return ConnErr, "OK"
    for prefix, cls in (("ISCSI_UEVENT_", Request), ("ISCSI_KEVENT_", Event),
                        ("ISCSI_ERR_", ConnErr), ("ISCSI_PARAM_", Param),
                        ("ISCSI_CONN_STATE_", ConnState)):
        if c_name.startswith(prefix):
            return cls, c_name[len(prefix):]
    raise AssertionError(f"no Python enum for {c_name}")


class HeaderFacts:
    """What the compiled program printed: constants, (offset, size) pairs, sizes."""

    def __init__(self, header: Path, out: str, enums: dict[str, list[str]]) -> None:
        self.header = header
        self.enums = enums
        self.values: dict[str, int] = {}
        self.layout: dict[str, tuple[int, int]] = {}
        for line in out.splitlines():
            kind, name, *nums = line.split()
            if kind == "const":
                self.values[name] = int(nums[0])
            else:
                self.layout[name] = (int(nums[0]), int(nums[1]))


def _c_program(header: Path, enums: dict[str, list[str]]) -> str:
    lines = [
        "#include <stdint.h>", "#include <stddef.h>", "#include <stdio.h>",
        "#include <linux/in.h>", "#include <linux/in6.h>",
        # Kernel-internal spellings iscsi_if.h uses; the uapi build has no such macros.
        "#define __packed __attribute__((packed))",
        "#define __aligned(x) __attribute__((aligned(x)))",
        f'#include "{header}"',
        "#define OFF(name, expr) printf(\"off %s %zu %zu\\n\", name, "
        "offsetof(struct iscsi_uevent, expr), sizeof(((struct iscsi_uevent *)0)->expr))",
        "#define SOFF(name, f) printf(\"off %s %zu %zu\\n\", name, "
        "offsetof(struct iscsi_stats, f), sizeof(((struct iscsi_stats *)0)->f))",
        "#define CONST(n) printf(\"const %s %lld\\n\", #n, (long long)(n))",
        "int main(void) {",
    ]
    for names in enums.values():
        lines += [f"  CONST({n});" for n in names]
    lines += [f"  CONST({n});" for n in DEFINES]
    for name, _, _ in ue.HEADER_FIELDS:
        lines.append(f'  OFF("{name}", {name});')
    lines += ['  OFF("u", u);', '  OFF("r", r);']
    for union, members in (("u", ue.U_MEMBERS), ("r", ue.R_MEMBERS)):
        for member, table in members.items():
            for fname, _, _ in table:
                expr = f"{union}.{member}" if member == fname else f"{union}.{member}.{fname}"
                lines.append(f'  OFF("{union}.{member}.{fname}", {expr});')
    for fname, _, _ in ue.STATS_FIELDS:
        lines.append(f'  SOFF("stats.{fname}", {fname});')
    lines += [
        '  printf("off stats.custom %zu %zu\\n", offsetof(struct iscsi_stats, custom), '
        "sizeof(struct iscsi_stats_custom));",
        '  printf("off sizeof.iscsi_uevent 0 %zu\\n", sizeof(struct iscsi_uevent));',
        '  printf("off sizeof.iscsi_stats 0 %zu\\n", sizeof(struct iscsi_stats));',
        '  printf("off alignof.iscsi_uevent 0 %zu\\n", _Alignof(struct iscsi_uevent));',
        "  return 0;", "}",
    ]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def facts(tmp_path_factory: pytest.TempPathFactory) -> HeaderFacts:
    header = _find_header()
    if header is None:
        pytest.skip(f"no kernel header at {HEADER_GLOB} (Debian linux-headers-amd64; "
                    "./scripts/setup installs it)")
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed (./scripts/setup installs it)")
    text = header.read_text()
    enums = {"iscsi_uevent_e": _enum_names(text, "iscsi_uevent_e")}
    for cname in ENUMS:
        enums[cname] = [n for n in _enum_names(text, cname) if n not in SENTINELS]
    work = tmp_path_factory.mktemp("iscsi_if")
    # iscsi_if.h includes the kernel-internal scsi/iscsi_proto.h (itt_t, __be32 and
    # friends) but uses nothing from it: an empty stand-in keeps the kernel's own
    # include tree, and its non-uapi linux/*.h, out of this userland build.
    (work / "scsi").mkdir()
    (work / "scsi" / "iscsi_proto.h").write_text("/* stand-in: nothing used */\n")
    source = work / "facts.c"
    source.write_text(_c_program(header, enums))
    binary = work / "facts"
    done = subprocess.run([gcc, "-std=gnu11", "-Wall", "-Werror", "-I", str(work),
                           "-o", str(binary), str(source)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, f"gcc failed against {header}:\n{done.stderr}"
    out = subprocess.run([str(binary)], capture_output=True, text=True, timeout=30,
                         check=True).stdout
    return HeaderFacts(header, out, enums)


# --- constants ----------------------------------------------------------------------

def test_every_uevent_code_matches(facts: HeaderFacts) -> None:
    names = facts.enums["iscsi_uevent_e"]
    assert len(names) > 40  # the whole enum was read, not a fragment
    for c_name in names:
        cls, py_name = _python_name(c_name)
        assert py_name in cls.__members__, f"{c_name} missing from {cls.__name__}"
        assert int(cls[py_name]) == facts.values[c_name], c_name
    modelled = {f"ISCSI_UEVENT_{m}" for m in Request.__members__} | {
        f"ISCSI_KEVENT_{m}" for m in Event.__members__}
    assert modelled == set(names)


@pytest.mark.parametrize("c_enum", sorted(ENUMS))
def test_every_enum_value_matches(facts: HeaderFacts, c_enum: str) -> None:
    cls, prefix = ENUMS[c_enum]
    names = facts.enums[c_enum]
    assert names, c_enum
    for c_name in names:
        _, py_name = _python_name(c_name)
        assert py_name in cls.__members__, f"{c_name} missing from {cls.__name__}"
        assert int(cls[py_name]) == facts.values[c_name], c_name
    modelled = {("ISCSI_OK" if m == "OK" and cls is ConnErr else prefix + m)
                for m in cls.__members__}
    assert modelled == set(names)


def test_defines_match(facts: HeaderFacts) -> None:
    for c_name, value in DEFINES.items():
        assert int(value) == facts.values[c_name], c_name


def test_values_the_notes_rely_on(facts: HeaderFacts) -> None:
    # The numbers docs/notes quote, pinned here too so a renumbering cannot hide.
    assert facts.values["ISCSI_UEVENT_CREATE_SESSION"] == 11
    assert facts.values["ISCSI_UEVENT_UNBIND_SESSION"] == 27
    assert facts.values["ISCSI_KEVENT_CONN_ERROR"] == 102
    assert facts.values["ISCSI_KEVENT_IF_ERROR"] == 103
    assert facts.values["ISCSI_ERR_TCP_CONN_CLOSE"] == 1020
    assert facts.values["ISCSI_PARAM_ISID"] == 33
    assert facts.values["ISCSI_PARAM_TGT_RESET_TMO"] == 35


# --- layout -------------------------------------------------------------------------

def test_uevent_size_and_header(facts: HeaderFacts) -> None:
    assert facts.layout["sizeof.iscsi_uevent"][1] == ue.UEVENT_SIZE
    assert facts.layout["alignof.iscsi_uevent"][1] == 8
    for name, offset, code in ue.HEADER_FIELDS:
        assert facts.layout[name] == (offset, struct.calcsize("=" + code)), name
    assert facts.layout["u"] == (ue.U_OFFSET, ue.U_SIZE)
    assert facts.layout["r"] == (ue.R_OFFSET, ue.R_SIZE)


@pytest.mark.parametrize("union", ["u", "r"])
def test_every_union_field_offset_and_size(facts: HeaderFacts, union: str) -> None:
    members = ue.U_MEMBERS if union == "u" else ue.R_MEMBERS
    base = ue.U_OFFSET if union == "u" else ue.R_OFFSET
    checked = 0
    for member, table in members.items():
        for fname, offset, code in table:
            got = facts.layout[f"{union}.{member}.{fname}"]
            assert got == (base + offset, struct.calcsize("=" + code)), \
                f"{union}.{member}.{fname}"
            checked += 1
    assert checked == sum(len(t) for t in members.values()) > 10


def test_stats_layout(facts: HeaderFacts) -> None:
    for fname, offset, code in ue.STATS_FIELDS:
        assert facts.layout[f"stats.{fname}"] == (offset, struct.calcsize("=" + code)), fname
    assert facts.layout["stats.custom"] == (ue.STATS_CUSTOM_OFFSET, ue.STATS_CUSTOM_SIZE)
    assert facts.layout["sizeof.iscsi_stats"][1] == ue.STATS_CUSTOM_OFFSET
