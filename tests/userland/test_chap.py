"""CHAP: RFC 1994 responses, binary encodings, reflection and secret rules."""

from __future__ import annotations

import base64
import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from userland.errors import AuthenticationError, ConfigError, ProtocolError
from userland.login.chap import (
    ChapExchange,
    Credentials,
    Secret,
    chap_response,
    check_secrets,
    decode_binary,
    encode_binary,
    parse_algorithms,
)


def test_md5_response_is_rfc_1994() -> None:
    # RFC 1994: MD5(identifier || secret || challenge)
    secret = Secret(b"supersecret1234")
    expected = hashlib.md5(b"\x07" + b"supersecret1234" + b"\x01\x02\x03").digest()
    assert chap_response(5, 7, secret, b"\x01\x02\x03") == expected


@pytest.mark.parametrize(("alg", "name", "size"),
                         [(5, "md5", 16), (6, "sha1", 20), (7, "sha256", 32),
                          (8, "sha3_256", 32)])
def test_every_algorithm(alg: int, name: str, size: int) -> None:
    out = chap_response(alg, 1, Secret(b"k" * 16), b"c" * 1024)
    assert len(out) == size
    assert out == hashlib.new(name, b"\x01" + b"k" * 16 + b"c" * 1024).digest()


@given(st.binary(min_size=1, max_size=1024))
def test_binary_values_round_trip_hex_and_base64(value: bytes) -> None:
    assert decode_binary("CHAP_C", encode_binary(value)) == value
    assert decode_binary("CHAP_C", "0b" + base64.b64encode(value).decode()) == value
    assert decode_binary("CHAP_C", "0X" + value.hex().upper()) == value


@pytest.mark.parametrize("bad", ["", "0x", "0xzz", "12ab", "0b!!!", "0b"])
def test_bad_binary_values_name_the_key(bad: str) -> None:
    with pytest.raises(ProtocolError, match="CHAP_C"):
        decode_binary("CHAP_C", bad)


def test_algorithm_list_parsing() -> None:
    assert parse_algorithms("md5") == (5,)
    assert parse_algorithms("sha256, md5,7") == (7, 5)
    assert parse_algorithms("SHA3-256,sha1") == (8, 6)
    with pytest.raises(ConfigError, match="unknown CHAP algorithm"):
        parse_algorithms("md4")


def test_secret_never_shows_itself() -> None:
    s = Secret(b"hunter2hunter2")
    assert "hunter2" not in repr(s) and "hunter2" not in str(s)
    creds = Credentials("alice", s)
    assert "hunter2" not in repr(creds)


def test_identical_secrets_are_refused_and_short_ones_warned() -> None:
    ours = Credentials("i", Secret(b"samesecret12345"))
    theirs = Credentials("t", Secret(b"samesecret12345"))
    with pytest.raises(ConfigError, match="must differ"):
        check_secrets(ours, theirs)
    warnings = check_secrets(Credentials("i", Secret(b"short")), None)
    assert len(warnings) == 1 and "shorter than 12" in warnings[0]
    assert check_secrets(Credentials("i", Secret(b"long enough secret")), None) == []


def _challenge_keys(challenge: bytes, alg: int = 5, ident: int = 9) -> dict[str, str]:
    return {"CHAP_A": str(alg), "CHAP_I": str(ident), "CHAP_C": encode_binary(challenge)}


def test_mutual_exchange_and_reflection() -> None:
    ours = Credentials("init", Secret(b"initiator-secret"))
    theirs = Credentials("tgt", Secret(b"target-secret-1"))
    ex = ChapExchange(ours, (5,), mutual=theirs)
    reply = dict(ex.answer_challenge(_challenge_keys(b"\xaa" * 16)))
    assert reply["CHAP_N"] == "init"
    assert decode_binary("CHAP_R", reply["CHAP_R"]) == chap_response(
        5, 9, ours.secret, b"\xaa" * 16)
    our_challenge = decode_binary("CHAP_C", reply["CHAP_C"])
    assert our_challenge != b"\xaa" * 16
    # The target proves itself with its own secret over our challenge.
    good = chap_response(5, int(reply["CHAP_I"]), theirs.secret, our_challenge)
    ex.verify_target({"CHAP_N": "tgt", "CHAP_R": encode_binary(good)})
    with pytest.raises(AuthenticationError, match="mutual CHAP"):
        ex.verify_target({"CHAP_N": "tgt", "CHAP_R": encode_binary(bytes(16))})
    with pytest.raises(AuthenticationError, match="mutual CHAP"):
        ex.verify_target({"CHAP_N": "someone", "CHAP_R": encode_binary(good)})
    # A later connection whose target reflects our challenge is refused.
    ex2 = ChapExchange(ours, (5,), mutual=theirs)
    with pytest.raises(AuthenticationError, match="reflection"):
        ex2.answer_challenge(_challenge_keys(our_challenge))


def test_challenge_limits_and_algorithm_outside_offer() -> None:
    ex = ChapExchange(Credentials("i", Secret(b"initiator-secret")), (5,))
    with pytest.raises(ProtocolError, match="exceeds 1024"):
        ex.answer_challenge(_challenge_keys(bytes(1025)))
    ex.answer_challenge(_challenge_keys(b"\x01" * 1024))
    with pytest.raises(ProtocolError, match="outside what we offered"):
        ex.answer_challenge(_challenge_keys(b"\x01" * 16, alg=7))
    with pytest.raises(ProtocolError, match="CHAP_I"):
        ex.answer_challenge(_challenge_keys(b"\x01" * 16, ident=300))
    with pytest.raises(ProtocolError, match="lacks CHAP_C"):
        ex.answer_challenge({"CHAP_A": "5", "CHAP_I": "1"})
