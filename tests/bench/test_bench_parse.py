"""The bench's own pure parts, fed with what the tools really printed on a test machine.

tests/bench/data/ holds captured output: iscsi-perf -t 2 against tgtd (and against a
closed port), fio --output-format=json on a loop device over the FUSE ceiling (and on
a device that does not exist), and
py-spy record --native --format raw of the session at 4k QD32.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from bench import report
from bench.children import ToolOutputError, reason
from bench.fuse_perf import parse_fio
from bench.libiscsi_perf import parse_iscsi_perf
from bench.points import BY_NAME, Result
from bench.pyspy import parse_raw, split_frame, summarize

DATA = Path(__file__).with_name("data")


def _text(name: str) -> str:
    return (DATA / name).read_text()


def test_iscsi_perf_figure_is_the_final_average_not_a_per_second_one() -> None:
    out = _text("iscsi-perf-4k-qd32-read.txt")
    # The run printed one per-second line (16411) before its summary (24744).
    assert "iops average 16411" in out
    assert parse_iscsi_perf(out) == 24744.0


def test_iscsi_perf_that_could_not_log_in_has_no_figure() -> None:
    with pytest.raises(ToolOutputError, match="Login Failed"):
        parse_iscsi_perf(_text("iscsi-perf-refused.txt"))


def test_fio_read_figure_and_mb_per_s_agree_with_fios_own_bandwidth() -> None:
    out = _text("fio-1m-qd8-read.json")
    point = BY_NAME["1m-qd8-read"]
    iops = parse_fio(out, point)
    assert iops == pytest.approx(349.112426)
    result = Result.from_iops("fuse-ceiling", point, iops)
    bw_bytes = json.loads(out)["jobs"][0]["read"]["bw_bytes"]
    assert result.mb_per_s == pytest.approx(bw_bytes / 1e6, rel=1e-3)


def test_fio_write_point_reads_the_write_side() -> None:
    out = _text("fio-4k-qd1-write.json")
    assert parse_fio(out, BY_NAME["4k-qd1-write"]) == pytest.approx(9048.951049)
    assert parse_fio(out, BY_NAME["4k-qd1-read"]) == 0.0  # that run did not read


def test_fio_output_without_json_is_an_error() -> None:
    with pytest.raises(ToolOutputError):
        parse_fio(_text("iscsi-perf-4k-qd32-read.txt"), BY_NAME["4k-qd1-read"])


def test_fio_job_that_failed_is_an_error_not_zero_iops() -> None:
    with pytest.raises(ToolOutputError, match="error 22"):
        parse_fio(_text("fio-no-such-device.txt"), BY_NAME["4k-qd1-read"])


def test_failure_reason_is_the_line_that_names_the_error() -> None:
    # fio's output ends in its JSON document; the reason is its own error line above it.
    assert reason(_text("fio-no-such-device.txt")).startswith("fio: pid=0, err=22/")
    assert reason(_text("iscsi-perf-refused.txt")).startswith("Login Failed.")
    assert reason("") == "(no output)"


def _results() -> list[Result]:
    point32 = BY_NAME["4k-qd32-read"]
    point1m = BY_NAME["1m-qd8-read"]
    write = BY_NAME["4k-qd1-write"]
    anchor = parse_iscsi_perf(_text("iscsi-perf-4k-qd32-read.txt"))
    return [
        Result.from_iops(report.ANCHOR, point32, anchor),
        Result.from_iops("session", point32, anchor / 2),
        Result.from_iops(report.CEILING, point1m, parse_fio(_text("fio-1m-qd8-read.json"),
                                                           point1m)),
        Result.from_iops("fuse", point1m, 100.0),
        Result.from_iops(report.CEILING, write, parse_fio(_text("fio-4k-qd1-write.json"),
                                                         write)),
    ]


def test_ratios_and_goals() -> None:
    results = _results()
    assert report.ratio(results, "session", "4k-qd32-read", report.ANCHOR) == pytest.approx(0.5)
    assert report.ratio(results, "fuse", "1m-qd8-read", report.CEILING) == \
        pytest.approx(100.0 / 349.112426)
    assert report.ratio(results, "session", "1m-qd8-read", report.ANCHOR) is None
    statuses = {goal.describe(): report.goal_status(results, goal)[0] for goal in report.GOALS}
    assert statuses["session >= 0.4x iscsi-perf at 4k-qd32-read"] == "met"
    assert statuses["fuse >= 0.5x fuse-ceiling at 1m-qd8-read"] == "not met"  # 0.29x
    assert statuses["session >= 0.8x iscsi-perf at 1m-qd8-read"] == "not measured"
    lines = report.goal_lines(results)
    assert any(line.endswith("met (measured 0.50x)") for line in lines)


def test_table_shows_every_result_and_a_dash_where_no_ratio_exists() -> None:
    text = report.table(_results())
    lines = text.splitlines()
    assert lines[0].split() == ["layer", "point", "IOPS", "MB/s", "/iscsi-perf", "/ceiling"]
    assert len(lines) == 2 + len(_results())
    write_row = next(line for line in lines if "4k-qd1-write" in line)
    assert write_row.split()[-2:] == ["-", "1.00x"]  # iscsi-perf only reads


def test_json_document_round_trips(tmp_path: Path) -> None:
    results = _results()
    path = report.write_json(report.document(results, config={"seconds_per_point": 5}),
                             tmp_path / "results" / "run.json")
    doc = json.loads(path.read_text())
    assert doc["config"] == {"seconds_per_point": 5}
    assert len(doc["results"]) == len(results)
    session = next(r for r in doc["results"] if r["layer"] == "session")
    assert session["ratio_to_iscsi_perf"] == pytest.approx(0.5)
    assert session["block_size"] == 4096 and session["queue_depth"] == 32
    assert session["ratio_to_ceiling"] is None
    assert {g["status"] for g in doc["goals"]} == {"met", "not met", "not measured"}
    assert not list(path.parent.glob("*.tmp"))


def test_chart_or_one_line_saying_why_not(tmp_path: Path) -> None:
    png = tmp_path / "chart.png"
    why = report.write_chart(_results(), png, "test")
    if importlib.util.find_spec("matplotlib") is None:
        assert why is not None and "matplotlib" in why and "\n" not in why
        assert not png.exists()
    else:
        assert why is None
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_py_spy_raw_profile_summary() -> None:
    text = _text("py-spy-session-4k-qd32-read.txt")
    stacks = parse_raw(text)
    total = sum(int(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line)
    assert sum(stacks.values()) == total > 0
    assert split_frame("Transport.receive (userland/transport.py)") == \
        ("Transport.receive", "userland/transport.py")
    profile = summarize(stacks, seconds=1)
    assert profile.samples == total
    assert 0 < profile.busy <= 1
    # This capture waits in libc's epoll_wait (29 samples) and once in Python's wrapper.
    waits = sum(n for frames, n in stacks.items()
                if frames[-1].startswith(("epoll_wait ", "select_epoll_poll_impl ")))
    assert waits == 30
    assert profile.waiting == pytest.approx(waits / total)
    shares = [share for _, share in profile.top_self]
    assert shares == sorted(shares, reverse=True)
    assert sum(share for _, share in profile.by_file) <= 1 + 1e-9
    inclusive = dict(profile.top_inclusive)
    assert any(name.startswith("SessionRunner._reader") for name in inclusive)
    assert not any("runpy" in name or name.startswith("main ") for name in inclusive)
    assert len(profile.lines()) == 4


def test_rounds_reduce_to_their_median_per_layer_and_point() -> None:
    from bench.run import median_results

    point = BY_NAME["4k-qd32-read"]
    anchor = parse_iscsi_perf(_text("iscsi-perf-4k-qd32-read.txt"))
    rounds = [Result.from_iops(report.ANCHOR, point, anchor * k) for k in (1.0, 3.0, 2.0)]
    rounds.insert(1, Result.from_iops("session", point, 10.0))
    merged = median_results(rounds)
    assert [(r.layer, r.point) for r in merged] == [(report.ANCHOR, point.name),
                                                    ("session", point.name)]
    assert merged[0].iops == pytest.approx(anchor * 2.0)
    assert merged[0].mb_per_s == pytest.approx(anchor * 2.0 * 4096 / 1e6)
    assert merged[1].iops == 10.0
