"""The seed corpus: what it holds, that the harnesses read it whole, and that it can be
recorded again from a real tgtd with record_corpus.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from userland.login.machine import LoginResult
from userland.pdu import R2T, DataIn, LoginResponse, NopIn, ScsiResponse, TextResponse

from .record_corpus import record
from .replay import load_replay
from .seeds import CORPUS_DIR, TO_INITIATOR, TO_TARGET, load_corpus
from tgt_fixtures import require_tgt

MAX_CORPUS_BYTES = 1 << 20


def test_corpus_is_small_and_from_tgt_and_lio() -> None:
    files = sorted(CORPUS_DIR.glob("*.seed"))
    assert files, f"no seeds in {CORPUS_DIR}"
    total = sum(p.stat().st_size for p in files)
    assert total < MAX_CORPUS_BYTES, f"corpus is {total} bytes"
    assert {rec.meta["target"] for rec in load_corpus()} == {"tgt", "lio"}


def test_every_recorded_byte_is_in_a_pdu() -> None:
    """The harnesses see each recording whole: no byte left over after splitting."""
    for rec in load_corpus():
        replay = load_replay(rec)
        for direction in (TO_TARGET, TO_INITIATOR):
            split = b"".join(w.raw for w in replay.wires if w.direction == direction)
            assert split == rec.stream(direction), f"{rec.name} {direction}: bytes left over"


def test_corpus_covers_the_exchanges_fuzzed() -> None:
    replays = [load_replay(rec) for rec in load_corpus()]
    seen = {type(w.pdu) for r in replays for w in r.wires if w.direction == TO_INITIATOR}
    assert {LoginResponse, TextResponse, ScsiResponse, DataIn, R2T, NopIn} <= seen
    logged_in = {r.name for r in replays if isinstance(r.login_result, LoginResult)}
    # Our own login machine replays every successful login to its end, CHAP and mutual
    # CHAP included: the session harness starts from these.
    for kind in ("tgt", "lio"):
        assert {f"{kind}-io-plain-0.seed", f"{kind}-io-chap-digests-0.seed",
                f"{kind}-io-mutual-header-digest-0.seed", f"{kind}-io-small-r2t-0.seed",
                f"{kind}-discovery-0.seed"} <= logged_in
    digests = {(r.header_digest, r.data_digest) for r in replays}
    assert {(False, False), (True, True), (True, False)} <= digests
    refused = [r for r in replays if "-refused-" in r.name]
    assert refused and all(r.login_result is None for r in refused)


@pytest.mark.tgt
def test_record_corpus_against_tgt(tmp_path: Path) -> None:
    """record_corpus.py still records every scenario (it is how the corpus is renewed)."""
    require_tgt()
    written = record(tmp_path)
    names = {p.name for p in written}
    assert names == {p.name for p in CORPUS_DIR.glob("tgt-*.seed")}
    for rec in load_corpus(tmp_path):
        replay = load_replay(rec)
        assert replay.wires, rec.name
        if rec.name.startswith("tgt-io-"):
            assert isinstance(replay.login_result, LoginResult), rec.name
