"""Fuzzing in CI: PDU decoder, text keys, SCSI parsers, login machine, session machine.

Each target gets its share of ``FUZZ_CASES`` mutated cases (100,000 in all under CI=true,
5,000 otherwise), grown from the real tgt exchanges in corpus/. Only project errors
(``IscsiError``) may come out; hangs and memory beyond the bound are findings too.

    FUZZ_CASES=100000 .venv/bin/python -m pytest tests/fuzz -k fuzz_target   # CI's budget
    FUZZ_SEED=other .venv/bin/python -m pytest tests/fuzz                    # new cases

A finding names the seed and case number; ``engine.replay_case`` brings it back.
"""

from __future__ import annotations

import os
import random
from functools import cache

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from userland.errors import IscsiError

from .engine import RESULTS, RSS_GROWTH_KIB, RUNS, Stats, fuzz, guards, run_case, signature
from .known import KNOWN
from .replay import Replay, load_replay
from .seeds import load_corpus
from .targets import TARGETS

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
TOTAL_CASES = int(os.environ.get("FUZZ_CASES", 100_000 if IN_CI else 5_000))
SEED = os.environ.get("FUZZ_SEED", "iscsi-handoff-1")
# Shares of the budget: the machines cost more per case than the parsers.
WEIGHTS = {"pdu-decoder": 0.25, "text-keys": 0.20, "scsi-parsers": 0.15,
           "login-machine": 0.20, "session-machine": 0.20}
HYPOTHESIS_EXAMPLES = int(os.environ.get("FUZZ_HYPOTHESIS_EXAMPLES", 300))


@cache
def replays() -> tuple[Replay, ...]:
    return tuple(load_replay(rec) for rec in load_corpus())


def _report(stats: Stats) -> str:
    lines = []
    for f in stats.findings.values():
        known = KNOWN.get(f.signature)
        tag = f"known, see {known}" if known else "NEW"
        lines.append(f"[{tag}] {f.signature}: {f.count} cases, first case {f.case} "
                     f"(FUZZ_SEED={stats.seed})\n{f.trace}\ninput: {f.description}")
    return "\n\n".join(lines)


@pytest.mark.parametrize("target_cls", TARGETS, ids=[t.name for t in TARGETS])
def test_fuzz_target(target_cls: type) -> None:
    target = target_cls(list(replays()))
    cases = max(1, round(TOTAL_CASES * WEIGHTS[target.name]))
    stats = fuzz(target, cases, SEED)
    RESULTS.append(stats.line())
    RUNS.append((stats.cases, stats.seconds))
    RESULTS.extend(stats.outcome_lines())
    RESULTS.extend(f"    known finding ({f.count} cases): {f.signature}, see {KNOWN[f.signature]}"
                   for f in stats.findings.values() if f.signature in KNOWN)
    print(stats.line())
    assert stats.cases == cases, f"only {stats.cases} of {cases} cases could be made"
    growth = stats.rss_after_kib - stats.rss_before_kib
    assert growth <= RSS_GROWTH_KIB, f"max RSS grew by {growth} KiB over the run"
    new = [f for f in stats.findings.values() if f.signature not in KNOWN]
    assert not new, "fuzzing found bugs:\n\n" + _report(stats)
    if stats.findings:
        print(_report(stats))


@pytest.mark.parametrize("target_cls", TARGETS, ids=[t.name for t in TARGETS])
def test_hypothesis_target(target_cls: type) -> None:
    """The same cases driven by hypothesis, which shrinks a failing one to its core."""
    target = target_cls(list(replays()))

    @settings(max_examples=HYPOTHESIS_EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.randoms(use_true_random=False))
    def case(rng: random.Random) -> None:
        made = target.make(rng)
        if made is None:
            return
        try:
            run_case(made)
        except IscsiError:
            pass
        except Exception as exc:
            if signature(exc) not in KNOWN:
                raise

    with guards():
        case()
