"""Record the fuzz seed corpus from a real tgtd (or LIO).

Run as root from the repository root: ``.venv/bin/python -m tests.fuzz.record_corpus``.

Starts a tgtd on 127.0.0.1 (iscsi_handoff.tgtlab), puts a RecordingProxy in front of it,
and runs this project's own initiator through it: discovery (SendTargets), logins without
CHAP, with CHAP and with mutual CHAP, with and without CRC32C digests, refused logins,
then REPORT LUNS, INQUIRY (standard and VPD), READ CAPACITY, MODE SENSE, READ, WRITE
(immediate data and R2T), NOP pings, a CHECK CONDITION and logout. Every connection
becomes one ``corpus/tgt-*.seed`` file (format: seeds.py). The CHAP accounts are those of
this throwaway lab, not secrets. Run from the repository root; it rewrites corpus/tgt-*.
"""

from __future__ import annotations

import argparse
import inspect
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from iscsi_handoff import liolab, tgtlab
from iscsi_handoff.tgtlab import Tgt
from userland import scsi
from userland.discovery.run import discover
from userland.errors import IscsiError
from userland.login.chap import Credentials, Secret
from userland.login.machine import LoginConfig, new_isid
from userland.login.run import login
from userland.portal import Portal
from userland.runner import SessionRunner
from userland.task import Task

from .recording_proxy import RecordingProxy
from .seeds import CORPUS_DIR, Recording

INITIATOR = "iqn.2026-12.lab.fuzz:initiator"
PREFIX = "iqn.2026-12.lab.fuzz"
CHAP = ("fuzz-user", "fuzz-secret-0123")
MUTUAL = ("fuzz-target", "fuzz-target-secret-4567")
DISK = {"tgt": scsi.int_to_lun(1), "lio": scsi.int_to_lun(0)}  # tgt's LUN 0 is its controller
BLOCK = 512
DIGESTS = {"HeaderDigest": "CRC32C,None", "DataDigest": "CRC32C,None"}
SMALL = {"MaxRecvDataSegmentLength": "4096", "MaxXmitDataSegmentLength": "4096",
         "MaxBurstLength": "8192", "FirstBurstLength": "4096", "InitialR2T": "Yes",
         "ImmediateData": "No"}

Scenario = Callable[[Portal], Awaitable[None]] | Callable[[Portal], None]


def _creds(pair: tuple[str, str]) -> Credentials:
    return Credentials(pair[0], Secret(pair[1].encode()))


def _config(target: str, *, chap: bool = False, mutual: bool = False,
            header: str = "None", data: str = "None",
            secret: tuple[str, str] | None = None) -> LoginConfig:
    return LoginConfig(initiator_name=INITIATOR, target_name=f"{PREFIX}:{target}",
                       isid=new_isid(),
                       credentials=_creds(secret or CHAP) if chap or secret else None,
                       mutual=_creds(MUTUAL) if mutual else None,
                       header_digest=(header,), data_digest=(data,))


async def _run(portal: Portal, config: LoginConfig,
               commands: list[Task], nop_wait: float = 0.0) -> None:
    runner = SessionRunner(portal, config, nop_interval=0.2, nop_timeout=5.0,
                           replacement_timeout=5.0, command_timeout=10.0)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await runner.start(nursery)
            for task in commands:
                await runner.execute(task)
            if nop_wait:
                await trio.sleep(nop_wait)  # idle: the runner pings, tgt answers
            await runner.close()


def _pattern(n: int) -> bytes:
    return bytes((i * 7 + 3) & 0xFF for i in range(n))


def _all_commands(disk: int) -> list[Task]:
    return [
        Task(disk, scsi.test_unit_ready_cdb()),  # the first one gets UNIT ATTENTION
        Task(disk, scsi.test_unit_ready_cdb()),
        Task(0, scsi.report_luns_cdb(), read_length=4096),
        Task(0, scsi.inquiry_cdb(), read_length=255),  # tgt's controller LUN
        Task(disk, scsi.inquiry_cdb(), read_length=255),
        *[Task(disk, scsi.inquiry_vpd_cdb(page), read_length=255)
          for page in (0x00, 0x80, 0x83, 0xB0, 0xB2)],
        Task(disk, scsi.read_capacity10_cdb(), read_length=8),
        Task(disk, scsi.read_capacity16_cdb(), read_length=32),
        Task(disk, scsi.mode_sense10_cdb(), read_length=255),
        Task(disk, scsi.write_cdb(8, 8), write_data=_pattern(8 * BLOCK)),
        Task(disk, scsi.read_cdb(8, 8), read_length=8 * BLOCK),
        Task(disk, scsi.read_cdb(1 << 20, 1), read_length=BLOCK),  # past the end
        Task(disk, scsi.request_sense_cdb(), read_length=252),
        Task(disk, scsi.sync_cache_cdb()),
    ]


def scenarios(disk: int) -> dict[str, Scenario]:
    def discovery(portal: Portal) -> None:
        discover(portal, initiator_name=INITIATOR)

    async def io_plain(portal: Portal) -> None:
        await _run(portal, _config("plain"), _all_commands(disk), nop_wait=0.7)

    async def io_chap_digests(portal: Portal) -> None:
        commands = [Task(disk, scsi.test_unit_ready_cdb()),
                    Task(disk, scsi.inquiry_cdb(), read_length=255),
                    Task(disk, scsi.read_capacity16_cdb(), read_length=32),
                    Task(disk, scsi.write_cdb(0, 4), write_data=_pattern(4 * BLOCK)),
                    Task(disk, scsi.read_cdb(0, 4), read_length=4 * BLOCK)]
        await _run(portal, _config("chap", chap=True, header="CRC32C", data="CRC32C"),
                   commands, nop_wait=0.5)

    async def io_mutual_header_digest(portal: Portal) -> None:
        commands = [Task(disk, scsi.test_unit_ready_cdb()),
                    Task(0, scsi.report_luns_cdb(), read_length=4096),
                    Task(disk, scsi.read_cdb(0, 2), read_length=2 * BLOCK)]
        await _run(portal, _config("mutual", chap=True, mutual=True, header="CRC32C"),
                   commands)

    async def io_small_r2t(portal: Portal) -> None:
        commands = [Task(disk, scsi.test_unit_ready_cdb()),
                    Task(disk, scsi.write_cdb(0, 40), write_data=_pattern(40 * BLOCK)),
                    Task(disk, scsi.read_cdb(0, 24), read_length=24 * BLOCK)]
        await _run(portal, _config("small"), commands)

    def refused_chap(portal: Portal) -> None:
        login(portal, _config("chap", secret=("fuzz-user", "wrong-secret-890")), timeout=10)

    def refused_no_chap(portal: Portal) -> None:
        login(portal, _config("chap"), timeout=10)

    def refused_unknown(portal: Portal) -> None:
        login(portal, _config("no-such-target"), timeout=10)

    return {"discovery": discovery, "io-plain": io_plain,
            "io-chap-digests": io_chap_digests,
            "io-mutual-header-digest": io_mutual_header_digest,
            "io-small-r2t": io_small_r2t, "refused-chap": refused_chap,
            "refused-no-chap": refused_no_chap, "refused-unknown": refused_unknown}


def _meta(kind: str, name: str, n: int, version: str) -> dict[str, object]:
    return {"target": kind, "target_version": version, "scenario": name, "connection": n,
            "initiator": INITIATOR, "chap": list(CHAP), "mutual": list(MUTUAL),
            "recorded_by": "tests/fuzz/record_corpus.py"}


def record(out: Path, kind: str = "tgt") -> list[Path]:
    """Record every scenario against a fresh tgtd (or LIO, in the VM lab's guest)."""
    written: list[Path] = []
    lab: Any
    lun_spec: Any
    if kind == "tgt":
        lab, lun_spec, version = Tgt(), tgtlab.LunSpec, _package_version("tgt")
    else:
        lab, lun_spec = liolab.Lio(), liolab.LunSpec
        version = f"kernel {os.uname().release}"
    with lab:
        disk = [lun_spec(size=1 << 20)]
        lab.add_target(f"{PREFIX}:plain", luns=disk)
        lab.add_target(f"{PREFIX}:chap", luns=disk, chap=CHAP, params=DIGESTS)
        lab.add_target(f"{PREFIX}:mutual", luns=disk, chap=CHAP, mutual=MUTUAL, params=DIGESTS)
        lab.add_target(f"{PREFIX}:small", luns=disk, params=SMALL)
        host, port = lab.portal.rsplit(":", 1)
        with RecordingProxy((host, int(port))) as proxy:
            portal = Portal.parse(proxy.portal, what="proxy")
            for name, scenario in scenarios(DISK[kind]).items():
                try:
                    if inspect.iscoroutinefunction(scenario):
                        trio.run(scenario, portal)
                    else:
                        scenario(portal)
                except IscsiError as exc:
                    if not name.startswith("refused"):
                        raise
                    print(f"{name}: refused as intended: {exc}")
                trio.run(trio.sleep, 0.2)  # let the proxy see both ends close
                for n, conn in enumerate(proxy.take()):
                    rec = Recording(f"{kind}-{name}-{n}.seed",
                                    _meta(kind, name, n, version), conn)
                    path = out / rec.name
                    path.write_text(rec.dump())
                    written.append(path)
                    size = sum(len(d) for _, d in conn)
                    print(f"{path}: {len(conn)} runs, {size} bytes")
    return written


def _package_version(package: str) -> str:
    proc = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package],
                          capture_output=True, text=True, check=False)
    return proc.stdout.strip() or "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=CORPUS_DIR)
    parser.add_argument("--target", choices=("tgt", "lio"), default="tgt",
                        help="lio: in the VM lab's guest (scripts/vm/run --exec ...)")
    args = parser.parse_args()
    why = (tgtlab.unavailable_reason() if args.target == "tgt"
           else liolab.unavailable_reason())
    if why:
        print(f"record_corpus: {why}", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    for old in args.out.glob(f"{args.target}-*.seed"):
        old.unlink()
    record(args.out, args.target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
