"""The benchmark: every layer at every point, in one run, against one tuned tgtd LUN.

    sudo .venv/bin/python -m bench.run [--quick] [--out DIR] [--seconds N] [--rounds N]
                                       [--layers L,..] [--profile]

Layers: libiscsi's iscsi-perf (the C anchor), our session without FUSE, our storage
file via loop with fio, and a pyfuse3 in-memory file via loop with fio (the FUSE
ceiling). Points go one at a time, each layer in turn, so the layers compared with each
other are measured close together on a noisy machine. Goals are printed, never asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import signal
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from bench import report
from bench.children import ChildFailed, ToolOutputError
from bench.fuse_perf import FuseLoop, run_fio
from bench.fuse_server import STORAGE as CEILING_STORAGE
from bench.libiscsi_perf import run_iscsi_perf
from bench.points import ALL_POINTS, BY_NAME, Point, Result
from bench.pyspy import Profile, Recorder, py_spy
from bench.session_perf import INITIATOR, run_session
from fallback_fuse.tree import short_name
from iscsi_handoff.tgtlab import LunSpec, Tgt, unavailable_reason
from userland.errors import IscsiError

TARGET = "iqn.2024-01.org.iscsi-handoff.bench:lun"
# Tuned for big bursts, as the issue asks; tgt's defaults would cap writes at 8 KiB PDUs.
TGT_PARAMS = {
    "MaxRecvDataSegmentLength": "262144",
    "MaxXmitDataSegmentLength": "262144",
    "FirstBurstLength": "262144",
    "MaxBurstLength": "1048576",
    "ImmediateData": "Yes",
    "InitialR2T": "No",
}
FUSE_QUEUE_DEPTH = 32  # session queue depth and FUSE max_background, as login --fuse has
RESULTS = Path(__file__).resolve().parent / "results"
LAYER_ORDER = ("iscsi-perf", "session", "fuse", "fuse-ceiling")
EXPECTED = (ChildFailed, ToolOutputError, IscsiError, OSError)


def _hold(signum: int, frame: FrameType | None) -> None:
    print("bench: still tearing down; one moment", file=sys.stderr, flush=True)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # the same orderly teardown as Ctrl-C


def _options(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="2 s a point and a 256 MiB LUN (a smoke run, ~1 min)")
    parser.add_argument("--seconds", type=int, default=None,
                        help="seconds of I/O per layer and point (default 5, --quick 2)")
    parser.add_argument("--out", type=Path, default=RESULTS,
                        help="folder for <timestamp>.json and .png (default bench/results)")
    parser.add_argument("--lun-mib", type=int, default=None,
                        help="LUN size in MiB, on /dev/shm (default 1024, --quick 256)")
    parser.add_argument("--layers", default=",".join(LAYER_ORDER),
                        help=f"comma-separated subset of {','.join(LAYER_ORDER)}")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure every point this many times, interleaved; the table "
                             "shows the median, the JSON every round (default 1)")
    parser.add_argument("--profile", action="store_true",
                        help="then run the session and FUSE points again under py-spy and "
                             "print where the time goes")
    opts = parser.parse_args(argv)
    opts.seconds = opts.seconds or (2 if opts.quick else 5)
    opts.lun_mib = opts.lun_mib or (256 if opts.quick else 1024)
    opts.layers = [name.strip() for name in opts.layers.split(",") if name.strip()]
    unknown = set(opts.layers) - set(LAYER_ORDER)
    if unknown:
        parser.error(f"unknown layer(s): {', '.join(sorted(unknown))}")
    if opts.seconds < 1:
        parser.error("--seconds must be at least 1")
    if opts.rounds < 1:
        parser.error("--rounds must be at least 1")
    return opts


def _missing(layers: list[str]) -> str | None:
    why = unavailable_reason()
    if why:
        return why
    tools = {"iscsi-perf": ["iscsi-perf"], "fuse": ["fio", "losetup"],
             "fuse-ceiling": ["fio", "losetup"]}
    for layer in layers:
        for tool in tools.get(layer, []):
            if shutil.which(tool) is None:
                return f"{tool} not found (./scripts/setup installs it), needed for {layer}"
        if layer.startswith("fuse") and not os.path.exists("/dev/fuse"):
            return "/dev/fuse is missing: the FUSE layers cannot run here"
    return None


def drop_caches() -> None:
    """Page cache only. Every read here is O_DIRECT or userland, and the LUN is on tmpfs
    (never dropped): this guards against a loop device that refused direct I/O."""
    with contextlib.suppress(OSError), open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("1\n")


def _fill(path: Path) -> None:
    """Give the LUN real pages: reads of a sparse tmpfs file would only copy zero pages."""
    chunk = os.urandom(1 << 20)
    with path.open("r+b") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(0)
        for _ in range(size // len(chunk)):
            f.write(chunk)


class Bench:
    def __init__(self, opts: argparse.Namespace) -> None:
        self.opts = opts
        self.results: list[Result] = []
        self.profiled: list[Result] = []
        self.profiles: dict[str, dict[str, Profile]] = {}
        self.errors: dict[str, str] = {}
        self.fuse_info: dict[str, dict[str, Any]] = {}
        self.loops: dict[str, FuseLoop] = {}
        self.tgt: Tgt | None = None

    def say(self, text: str) -> None:
        print(text, flush=True)

    # -- one measurement

    def _measure(self, layer: str, point: Point, *, profile_dir: Path | None = None
                 ) -> Result | None:
        if layer in self.errors:  # its setup failed
            return None
        try:
            return self._run(layer, point, profile_dir)
        except EXPECTED as exc:
            self.errors[f"{layer} {point.name}"] = str(exc)
            self.say(f"  {layer} {point.name}: failed: {exc}")
            return None

    def _run(self, layer: str, point: Point, profile_dir: Path | None) -> Result | None:
        seconds = self.opts.seconds
        recorders: list[Recorder] = []
        spy = py_spy() if profile_dir is not None else None

        def record(pid: int, duration: int) -> None:
            if spy is not None and profile_dir is not None:
                path = profile_dir / f"{layer}-{point.name}.txt"
                recorders.append(Recorder(spy, pid, duration, path))

        try:
            result = self._one(layer, point, seconds, record)
        except BaseException:
            for rec in recorders:
                rec.cancel()
            raise
        for rec in recorders:
            self.profiles.setdefault(layer, {})[point.name] = rec.finish()
        return result

    def _one(self, layer: str, point: Point, seconds: int,
             record: Callable[[int, int], None]) -> Result | None:
        assert self.tgt is not None
        if layer == "iscsi-perf":
            if point.write:
                return None
            return run_iscsi_perf(self.tgt.url(TARGET), point, seconds)[0]
        if layer == "session":
            # py-spy stops before the child's measuring ends: the tail is its logout.
            return run_session(self.tgt.portal, TARGET, point, seconds,
                               on_measuring=lambda pid: record(pid, max(1, seconds - 1)))
        fuse = self.loops.get(layer)
        if fuse is None or fuse.device is None:
            return None
        record(fuse.pid, seconds)
        return run_fio(layer, fuse.device, point, seconds)[0]

    # -- the run

    def _mount(self, stack: contextlib.ExitStack, layer: str) -> None:
        assert self.tgt is not None
        if layer == "fuse":
            cmd = [sys.executable, "-m", "iscsi_handoff", "login", "--portal",
                   self.tgt.portal, "--target", TARGET, "--fuse", "{mount}",
                   "--initiator-name", INITIATOR, "--queue-depth", str(FUSE_QUEUE_DEPTH)]
            storage = Path("127.0.0.1", short_name(TARGET), "storage")
        else:
            cmd = [sys.executable, "-m", "bench.fuse_server", "{mount}",
                   str(self.opts.lun_mib << 20)]
            storage = CEILING_STORAGE
        try:
            fuse = stack.enter_context(FuseLoop(layer, cmd, storage,
                                                queue_depth=FUSE_QUEUE_DEPTH))
        except EXPECTED as exc:
            self.errors[layer] = f"setup: {exc}"
            self.say(f"  {layer}: cannot set up: {exc}")
            return
        self.loops[layer] = fuse
        self.fuse_info[layer] = {"loop_device": fuse.device, "loop_direct_io": fuse.direct_io,
                                 "max_background": fuse.max_background}
        if not fuse.direct_io:
            self.say(f"  {layer}: the kernel refused direct I/O on {fuse.device}: requests "
                     "reach FUSE one at a time")
        self.say(f"  {layer}: {fuse.device} over {fuse.mountpoint}/{storage} "
                 f"(max_background {fuse.max_background})")

    def run(self) -> None:
        with contextlib.ExitStack() as stack:
            try:
                self._run_all(stack)
            finally:
                # A second Ctrl-C must not leave a loop device or a mount behind.
                signal.signal(signal.SIGINT, _hold)
                signal.signal(signal.SIGTERM, _hold)
                self.say("tearing down: fio, loop devices, FUSE, sessions, tgtd")
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, _on_sigterm)

    def _run_all(self, stack: contextlib.ExitStack) -> None:
        opts = self.opts
        self.say(f"starting tgtd with a {opts.lun_mib} MiB LUN on /dev/shm")
        self.tgt = stack.enter_context(Tgt())
        target = self.tgt.add_target(TARGET, luns=[LunSpec(size=opts.lun_mib << 20)],
                                     params=TGT_PARAMS)
        _fill(target.lun_paths[0])
        self.say(f"  tgtd -C {self.tgt.control} on {self.tgt.portal}, {TARGET}")
        for layer in ("fuse", "fuse-ceiling"):
            if layer in opts.layers:
                self._mount(stack, layer)
        for n in range(opts.rounds):
            title = "measuring" if opts.rounds == 1 else f"measuring, round {n + 1}"
            self._pass(title, self.results, None)
        if opts.profile:
            spy = py_spy()
            if spy is None:
                self.say("py-spy is not installed (pip install -e '.[bench]'): no profile")
            else:
                folder = opts.out / f"{opts.stamp}-profile"
                folder.mkdir(parents=True, exist_ok=True)
                self._pass("profiling (figures under py-spy, not in the table)",
                           self.profiled, folder, skip=("iscsi-perf",))

    def _pass(self, title: str, into: list[Result], profile_dir: Path | None,
              skip: tuple[str, ...] = ()) -> None:
        points = ALL_POINTS  # reads first, then writes
        layers = [layer for layer in LAYER_ORDER if layer in self.opts.layers
                  and layer not in skip]
        self.say(f"{title}: {len(points)} points x {len(layers)} layers, "
                 f"{self.opts.seconds} s each")
        for point in points:
            if not point.write:
                drop_caches()
            for layer in layers:
                result = self._measure(layer, point, profile_dir=profile_dir)
                if result is not None:
                    into.append(result)
                    self.say(f"  {point.name:14} {layer:13} {result.iops:>10,.0f} IOPS "
                             f"{result.mb_per_s:>9,.1f} MB/s")


def _machine() -> dict[str, Any]:
    load = os.getloadavg()
    return {"nproc": os.cpu_count(), "kernel": platform.release(),
            "python": platform.python_version(), "loadavg": [round(x, 2) for x in load]}


def main(argv: list[str] | None = None) -> int:
    opts = _options(argv)
    why = _missing(opts.layers)
    if why:
        print(f"bench: {why}", file=sys.stderr)
        return 2
    opts.stamp = time.strftime("%Y%m%d-%H%M%S")
    # SIGINT too: a shell script's background job starts with SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _on_sigterm)
    bench = Bench(opts)
    started = time.time()
    machine_before = _machine()
    interrupted = False
    try:
        bench.run()
    except KeyboardInterrupt:
        interrupted = True
        print("bench: interrupted; everything it started is stopped", file=sys.stderr)
    except EXPECTED as exc:
        bench.errors["setup"] = str(exc)
        print(f"bench: {exc}", file=sys.stderr)
    return _finish(bench, opts, started, machine_before, interrupted)


def median_results(rounds: list[Result]) -> list[Result]:
    """One result per layer and point, in first-seen order: the median of its rounds."""
    groups: dict[tuple[str, str], list[Result]] = {}
    for r in rounds:
        groups.setdefault((r.layer, r.point), []).append(r)
    out = []
    for (layer, point), group in groups.items():
        iops = statistics.median(r.iops for r in group)
        out.append(Result.from_iops(layer, BY_NAME[point], iops))
    return out


def _finish(bench: Bench, opts: argparse.Namespace, started: float,
            machine_before: dict[str, Any], interrupted: bool) -> int:
    results = median_results(bench.results)
    print()
    print(report.table(results) if results else "no results")
    print()
    for line in report.goal_lines(results):
        print(line)
    for layer, by_point in bench.profiles.items():
        for point, profile in by_point.items():
            print(f"\nwhere the time goes: {layer} {point} (py-spy)")
            for line in profile.lines():
                print(f"  {line}")
    for where, error in bench.errors.items():
        print(f"error: {where}: {error}")
    doc = report.document(
        results, started=time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        wall_seconds=round(time.time() - started, 1), interrupted=interrupted,
        machine={"before": machine_before, "after": _machine()},
        config={"seconds_per_point": opts.seconds, "lun_bytes": opts.lun_mib << 20,
                "lun_backing": "/dev/shm (tmpfs), filled with random bytes",
                "tgt_params": TGT_PARAMS, "fuse_queue_depth": FUSE_QUEUE_DEPTH,
                "layers": opts.layers, "quick": opts.quick, "rounds": opts.rounds,
                "mb": "10**6 bytes"},
        fuse=bench.fuse_info, errors=bench.errors,
        rounds=[r.__dict__ for r in bench.results],
        profiled_results=[r.__dict__ for r in bench.profiled],
        profiles={layer: {p: prof.as_dict() for p, prof in by.items()}
                  for layer, by in bench.profiles.items()})
    path = report.write_json(doc, opts.out / f"{opts.stamp}.json")
    print(f"\nwrote {path}")
    if results:
        title = (f"iscsi-handoff bench {opts.stamp}: {opts.seconds} s/point, "
                 f"median of {opts.rounds}, "
                 f"{machine_before['nproc']} cores, load {machine_before['loadavg'][0]}")
        why = report.write_chart(results, opts.out / f"{opts.stamp}.png", title)
        print(why or f"wrote {opts.out / f'{opts.stamp}.png'}")
    if interrupted:
        return 130
    return 1 if bench.errors else 0


if __name__ == "__main__":
    sys.exit(main())
