"""Text keys (RFC 7143 sections 6, 12, 13): codec, continuation, negotiation."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from userland.errors import ConfigError, NegotiationError, ProtocolError
from userland.keys import (
    KEYS,
    RESULT_KEYS,
    KeyKind,
    Negotiated,
    Negotiator,
    Pair,
    Scope,
    Sender,
    TextAssembler,
    Use,
    decode_text,
    encode_text,
    parse_number,
    spec_for,
    split_text,
)

# -- strategies

_KNOWN = sorted(k for k, s in KEYS.items() if s.kind is not KeyKind.EXTENSION)
keys = st.one_of(
    st.sampled_from(_KNOWN),
    st.from_regex(r"[A-Z][A-Za-z0-9.\-+@_]{0,62}", fullmatch=True),
    st.from_regex(r"X#[A-Za-z0-9.\-+@_]{1,61}", fullmatch=True),
)
# Any Unicode but NUL and lone surrogates; at most 4 bytes a character, so at most 200
# bytes: inside every key's limit (223 for names, 255 otherwise).
values = st.text(st.characters(codec="utf-8", exclude_characters="\0"), max_size=50)
pair_lists = st.lists(st.tuples(keys, values), max_size=20)


# -- codec


@given(pair_lists)
def test_encode_decode_round_trip(pairs: list[Pair]) -> None:
    data = encode_text(pairs)
    assert data.count(b"\0") == len(pairs)
    assert decode_text(data) == pairs


@given(pair_lists, st.integers(0, 3))
def test_trailing_padding_is_tolerated(pairs: list[Pair], pad: int) -> None:
    assert decode_text(encode_text(pairs) + bytes(pad)) == pairs


@given(st.binary(max_size=400))
def test_decode_of_any_bytes_raises_only_protocol_error(data: bytes) -> None:
    try:
        pairs = decode_text(data)
    except ProtocolError:
        return
    assert encode_text(pairs) == data.rstrip(b"\0") + (b"\0" if pairs else b"")


def test_encoding_is_key_equals_value_nul() -> None:
    assert encode_text([("HeaderDigest", "CRC32C,None"), ("TargetAlias", "")]) == (
        b"HeaderDigest=CRC32C,None\0TargetAlias=\0")
    assert encode_text([]) == b""


@pytest.mark.parametrize("data, match", [
    (b"NoEquals\0", "without '='"),
    (b"=value\0", "empty key"),
    (b"lower=1\0", "not a key name"),
    (b"Bad Key=1\0", "not a key name"),
    (b"1Key=1\0", "not a key name"),
    (b"X#=1\0", "not a key name"),
    (b"K\xc3\xa9y=1\0", "not a key name"),
    (b"Key=\xff\xfe\0", "not UTF-8"),
    (b"A=1\0\0B=2\0", "empty key=value pair"),
    (b"A=1", "ends inside"),
    (b"A=1\0B=2", "ends inside"),
    (b"K" * 64 + b"=1\0", "longer than 63"),
    (b"TargetAlias=" + b"a" * 256 + b"\0", "256 bytes, beyond its limit of 255"),
    (b"TargetAlias=" + "\u00e9".encode() * 128 + b"\0", "256 bytes"),
    (b"HeaderDigest=None," + b"a" * 256 + b"\0", "item of the value of HeaderDigest"),
    (b"TargetName=iqn." + b"a" * 220 + b"\0", "limit of 223"),
    (b"CHAP_C=0x" + b"ab" * 1025 + b"\0", "1025 bytes, beyond its limit of 1024"),
    (b"SomeVendorKey=" + b"v" * 256 + b"\0", "limit of 255"),
    (b"X-com.example.big=" + b"v" * 256 + b"\0", "limit of 255"),
])
def test_decode_refuses_and_names_the_problem(data: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        decode_text(data)


@pytest.mark.parametrize("data, pairs", [
    (b"", []),
    (b"\0\0\0\0", []),
    (b"iSCSIProtocolLevel=1\0", [("iSCSIProtocolLevel", "1")]),  # 13.25: lower-case i
    (b"X#NodeArchitecture=ExampleOS/1,Ex_SW/2\0",
     [("X#NodeArchitecture", "ExampleOS/1,Ex_SW/2")]),
    (b"X-com.example.do_it=1\0", [("X-com.example.do_it", "1")]),
    (b"CHAP_C=0bAAAA==\0", [("CHAP_C", "0bAAAA==")]),  # '=' inside a value
    (b"K" * 63 + b"=\0", [("K" * 63, "")]),
    (b"TargetAlias=" + "\u00e9".encode() * 127 + b"\0", [("TargetAlias", "\u00e9" * 127)]),
])
def test_decode_accepts_the_edges(data: bytes, pairs: list[Pair]) -> None:
    assert decode_text(data) == pairs


def test_binary_values_count_decoded_bytes() -> None:
    challenge = "0x" + "ab" * 1024  # 12.1.3: up to 1024 bytes
    assert decode_text(f"CHAP_C={challenge}\0".encode()) == [("CHAP_C", challenge)]
    base64 = "0b" + "A" * 1364  # 1023 bytes
    assert decode_text(f"CHAP_R={base64}\0".encode()) == [("CHAP_R", base64)]
    # 6.1: "not its encoded representation": 255 bytes in hex on an unknown key is fine
    assert decode_text(b"X-vendor.blob=0x" + b"00" * 255 + b"\0")
    with pytest.raises(ProtocolError, match="256 bytes"):
        decode_text(b"X-vendor.blob=0x" + b"00" * 256 + b"\0")


@pytest.mark.parametrize("pairs, match", [
    ([("Key", "a\0b")], "NUL"),
    ([("bad key", "1")], "not a key name"),
    ([("TargetAlias", "a" * 256)], "limit of 255"),
    ([("Key", "\ud800")], "not valid Unicode"),
])
def test_encode_refuses_our_own_bad_text(pairs: list[Pair], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        encode_text(pairs)


@pytest.mark.parametrize("text, number", [
    ("0", 0), ("8192", 8192), ("0x2000", 8192), ("0X2000", 8192), ("0xffffffffffffffff",
                                                                      2**64 - 1),
    ("", None), ("08192", None), ("-1", None), ("1e3", None), (" 1", None), ("0x", None),
    ("18446744073709551616", None), ("\u0661", None), ("0b1", None),
])
def test_parse_number(text: str, number: int | None) -> None:
    assert parse_number(text) == number


# -- continuation


@given(pair_lists)
def test_assembler_split_at_every_point_equals_unsplit(pairs: list[Pair]) -> None:
    text = encode_text(pairs)
    whole = decode_text(text)
    assembler = TextAssembler()
    for cut in range(len(text) + 1):
        assert assembler.feed(text[:cut], True) is None
        assert assembler.in_progress
        assert assembler.feed(text[cut:], False) == whole
        assert not assembler.in_progress


@given(pair_lists, st.lists(st.integers(0, 4000), max_size=8))
def test_assembler_many_pieces(pairs: list[Pair], cuts: list[int]) -> None:
    text = encode_text(pairs)
    bounds = sorted({min(c, len(text)) for c in cuts})
    pieces = [text[a:b] for a, b in zip([0, *bounds], [*bounds, len(text)], strict=True)]
    assembler = TextAssembler()
    for piece in pieces[:-1]:
        assert assembler.feed(piece, True) is None
    assert assembler.feed(pieces[-1], False) == pairs


@given(pair_lists, st.integers(1, 600))
def test_split_text_and_assembler_round_trip(pairs: list[Pair], segment: int) -> None:
    text = encode_text(pairs)
    chunks = split_text(text, segment)
    assert b"".join(chunks) == text
    assert all(len(c) <= segment for c in chunks)
    assert all(len(c) == segment for c in chunks[:-1])
    assembler = TextAssembler()
    for i, chunk in enumerate(chunks):
        last = i == len(chunks) - 1
        got = assembler.feed(chunk, continue_bit=not last)
        assert (got == pairs) if last else got is None


def test_split_text_edges() -> None:
    assert split_text(b"", 8192) == [b""]
    assert split_text(b"abc", 8192) == [b"abc"]
    assert split_text(b"abcdef", 3) == [b"abc", b"def"]
    with pytest.raises(ValueError):
        split_text(b"abc", 0)


def test_assembler_is_bounded_and_recovers() -> None:
    assembler = TextAssembler(max_bytes=100)
    assert assembler.feed(b"A=" + b"x" * 50, True) is None
    with pytest.raises(ProtocolError, match="past 100 bytes"):
        assembler.feed(b"x" * 50 + b"\0", False)
    assert not assembler.in_progress
    assert assembler.feed(b"A=1\0", False) == [("A", "1")]
    with pytest.raises(ProtocolError, match="ends inside"):
        assembler.feed(b"A=1", False)
    assert assembler.feed(b"B=2\0", False) == [("B", "2")]


def test_assembler_default_bound_is_64_kib() -> None:
    assembler = TextAssembler()
    big = b"X-a=" + b"v" * 200 + b"\0"
    for _ in range(65536 // len(big)):
        assert assembler.feed(big, True) is None
    with pytest.raises(ProtocolError, match="65536"):
        assembler.feed(big, True)


# -- the key table


SECTION_13 = {
    "HeaderDigest", "DataDigest", "MaxConnections", "SendTargets", "TargetName",
    "InitiatorName", "TargetAlias", "InitiatorAlias", "TargetAddress",
    "TargetPortalGroupTag", "InitialR2T", "ImmediateData", "MaxRecvDataSegmentLength",
    "MaxBurstLength", "FirstBurstLength", "DefaultTime2Wait", "DefaultTime2Retain",
    "MaxOutstandingR2T", "DataPDUInOrder", "DataSequenceInOrder", "ErrorRecoveryLevel",
    "SessionType", "X-", "X#", "TaskReporting", "iSCSIProtocolLevel", "OFMarker",
    "IFMarker", "OFMarkInt", "IFMarkInt", "X#NodeArchitecture",
}


def test_every_key_of_section_13_and_auth_method_is_in_the_table() -> None:
    assert SECTION_13 | {"AuthMethod"} <= set(KEYS)
    for name in SECTION_13:
        assert KEYS[name].section.startswith("13."), name
    assert KEYS["AuthMethod"].section == "12.1"
    assert all(spec.name == name for name, spec in KEYS.items())


@pytest.mark.parametrize("name, kind, default, lo, hi", [
    ("HeaderDigest", KeyKind.LIST, "None", None, None),
    ("DataDigest", KeyKind.LIST, "None", None, None),
    ("MaxConnections", KeyKind.NUMERIC_MIN, "1", 1, 65535),
    ("InitialR2T", KeyKind.BOOL_OR, "Yes", None, None),
    ("ImmediateData", KeyKind.BOOL_AND, "Yes", None, None),
    ("MaxRecvDataSegmentLength", KeyKind.NUMERIC_DECLARATIVE, "8192", 512, 2**24 - 1),
    ("MaxBurstLength", KeyKind.NUMERIC_MIN, "262144", 512, 2**24 - 1),
    ("FirstBurstLength", KeyKind.NUMERIC_MIN, "65536", 512, 2**24 - 1),
    ("DefaultTime2Wait", KeyKind.NUMERIC_MAX, "2", 0, 3600),
    ("DefaultTime2Retain", KeyKind.NUMERIC_MIN, "20", 0, 3600),
    ("MaxOutstandingR2T", KeyKind.NUMERIC_MIN, "1", 1, 65535),
    ("DataPDUInOrder", KeyKind.BOOL_OR, "Yes", None, None),
    ("DataSequenceInOrder", KeyKind.BOOL_OR, "Yes", None, None),
    ("ErrorRecoveryLevel", KeyKind.NUMERIC_MIN, "0", 0, 2),
    ("TargetPortalGroupTag", KeyKind.NUMERIC_DECLARATIVE, "", 0, 65535),
    ("TaskReporting", KeyKind.LIST, "RFC3720", None, None),
    ("iSCSIProtocolLevel", KeyKind.NUMERIC_MIN, "1", 0, 31),
    ("SessionType", KeyKind.DECLARATIVE, "Normal", None, None),
    ("OFMarker", KeyKind.OBSOLETE, "No", None, None),
    ("IFMarkInt", KeyKind.OBSOLETE, "", None, None),
])
def test_key_kinds_defaults_ranges(name: str, kind: KeyKind, default: str, lo: int | None,
                                   hi: int | None) -> None:
    spec = KEYS[name]
    assert (spec.kind, spec.default, spec.lo, spec.hi) == (kind, default, lo, hi)


def test_senders_uses_scopes() -> None:
    for name in ("InitiatorName", "InitiatorAlias", "SessionType", "SendTargets"):
        assert KEYS[name].sender is Sender.INITIATOR
    for name in ("TargetAlias", "TargetAddress", "TargetPortalGroupTag"):
        assert KEYS[name].sender is Sender.TARGET
    for name in ("HeaderDigest", "DataDigest", "MaxRecvDataSegmentLength", "AuthMethod"):
        assert KEYS[name].scope is Scope.CONNECTION
    assert KEYS["MaxBurstLength"].leading_only and KEYS["MaxBurstLength"].use is Use.LO
    assert not KEYS["HeaderDigest"].leading_only
    assert KEYS["SendTargets"].use is Use.FFPO
    assert spec_for("X-com.example.k") is KEYS["X-"]
    assert spec_for("X#Something") is KEYS["X#"]
    assert spec_for("X#NodeArchitecture") is KEYS["X#NodeArchitecture"]
    assert spec_for("Nope") is None


# -- negotiation: our offer, the target's answer

ATTR = {
    "HeaderDigest": "header_digest", "DataDigest": "data_digest",
    "MaxConnections": "max_connections", "InitialR2T": "initial_r2t",
    "ImmediateData": "immediate_data", "MaxBurstLength": "max_burst_length",
    "FirstBurstLength": "first_burst_length", "DefaultTime2Wait": "default_time2wait",
    "DefaultTime2Retain": "default_time2retain", "MaxOutstandingR2T": "max_outstanding_r2t",
    "DataPDUInOrder": "data_pdu_in_order", "DataSequenceInOrder": "data_sequence_in_order",
    "ErrorRecoveryLevel": "error_recovery_level", "iSCSIProtocolLevel": "iscsi_protocol_level",
    "TaskReporting": "task_reporting",
}


def typed(key: str, value: str) -> object:
    kind = KEYS[key].kind
    if kind in (KeyKind.BOOL_AND, KeyKind.BOOL_OR):
        return value == "Yes"
    if kind in (KeyKind.NUMERIC_MIN, KeyKind.NUMERIC_MAX):
        return int(value)
    return value


def offered(key: str, ours: str) -> Negotiator:
    n = Negotiator()
    n.offer(key, ours)
    assert n.take_offers() == [(key, ours)]
    return n


ANSWERS = [
    # key, ours, theirs, (result, chosen_by) or an error pattern
    ("HeaderDigest", "CRC32C,None", "CRC32C", ("CRC32C", "initiator")),
    ("HeaderDigest", "CRC32C,None", "None", ("None", "target")),
    ("HeaderDigest", "CRC32C,None", "MD5",
     r"target answered HeaderDigest=MD5, outside what we offered \(CRC32C,None\)"),
    ("HeaderDigest", "CRC32C", "None", r"HeaderDigest=None, outside .*\(CRC32C\)"),
    ("DataDigest", "CRC32C,None", "CRC32C,None", r"DataDigest=CRC32C,None, outside"),
    ("DataDigest", "None", "None", ("None", "initiator")),
    ("HeaderDigest", "CRC32C", "Reject", ("None", "default")),
    ("DataDigest", "CRC32C", "NotUnderstood", ("None", "default")),
    ("TaskReporting", "RFC3720", "RFC3720", ("RFC3720", "initiator")),
    ("TaskReporting", "RFC3720", "FastAbort", "TaskReporting=FastAbort, outside"),
    ("MaxBurstLength", "262144", "65536", ("65536", "target")),
    ("MaxBurstLength", "262144", "262144", ("262144", "initiator")),
    ("MaxBurstLength", "262144", "0x10000", ("65536", "target")),
    ("MaxBurstLength", "262144", "262145",
     r"MaxBurstLength=262145, above our offer MaxBurstLength=262144 \(result function "
     r"Minimum"),
    ("MaxBurstLength", "262144", "511", r"not a number in 512\.\.16777215"),
    ("MaxBurstLength", "262144", "065536", "not a number"),
    ("MaxBurstLength", "262144", "64k", "not a number"),
    ("MaxBurstLength", "262144", "Irrelevant", ("262144", "default")),
    ("FirstBurstLength", "65536", "8192", ("8192", "target")),
    ("FirstBurstLength", "65536", "Irrelevant", ("65536", "default")),
    ("MaxConnections", "4", "1", ("1", "target")),
    ("MaxConnections", "4", "5", "above our offer"),
    ("MaxConnections", "4", "0", r"not a number in 1\.\.65535"),
    ("DefaultTime2Retain", "20", "0", ("0", "target")),
    ("DefaultTime2Retain", "20", "3601", r"0\.\.3600"),
    ("MaxOutstandingR2T", "8", "1", ("1", "target")),
    ("ErrorRecoveryLevel", "2", "1", ("1", "target")),
    ("ErrorRecoveryLevel", "0", "1", "above our offer"),
    ("ErrorRecoveryLevel", "2", "3", r"0\.\.2"),
    ("iSCSIProtocolLevel", "1", "0", ("0", "target")),
    ("iSCSIProtocolLevel", "1", "2", "above our offer"),
    ("DefaultTime2Wait", "2", "5", ("5", "target")),
    ("DefaultTime2Wait", "2", "2", ("2", "initiator")),
    ("DefaultTime2Wait", "2", "1",
     r"DefaultTime2Wait=1, below our offer DefaultTime2Wait=2 \(result function Maximum"),
    ("DefaultTime2Wait", "2", "3601", r"0\.\.3600"),
    ("ImmediateData", "Yes", "Yes", ("Yes", "initiator")),
    ("ImmediateData", "Yes", "No", ("No", "target")),
    ("ImmediateData", "No", "No", ("No", "initiator")),
    ("ImmediateData", "No", "Yes", "ImmediateData=Yes to our ImmediateData=No; the result "
                                   "function AND makes it No"),
    ("ImmediateData", "Yes", "yes", "not Yes or No"),
    ("ImmediateData", "Yes", "Reject", ("Yes", "default")),
    ("InitialR2T", "No", "No", ("No", "initiator")),
    ("InitialR2T", "No", "Yes", ("Yes", "target")),
    ("InitialR2T", "Yes", "Yes", ("Yes", "initiator")),
    ("InitialR2T", "Yes", "No", "the result function OR makes it Yes"),
    ("DataPDUInOrder", "Yes", "No", "DataPDUInOrder=No to our DataPDUInOrder=Yes"),
    ("DataSequenceInOrder", "No", "Yes", ("Yes", "target")),
    ("DataSequenceInOrder", "No", "", "not Yes or No"),
]


@pytest.mark.parametrize("key, ours, theirs, expected", ANSWERS)
def test_answer_to_our_offer(key: str, ours: str, theirs: str,
                             expected: tuple[str, str] | str) -> None:
    n = offered(key, ours)
    if isinstance(expected, str):
        with pytest.raises(NegotiationError, match=expected):
            n.receive([(key, theirs)])
        return
    assert n.receive([(key, theirs)]) == []
    assert n.outstanding() == set()
    result = n.result()
    value, by = expected
    assert getattr(result, ATTR[key]) == typed(key, value)
    assert result.chosen_by[key] == by


@given(st.integers(0, 3600), st.integers(0, 3600))
def test_minimum_and_maximum_for_any_numbers(ours: int, theirs: int) -> None:
    n = offered("DefaultTime2Retain", str(ours))
    m = offered("DefaultTime2Wait", str(ours))
    if theirs <= ours:
        n.receive([("DefaultTime2Retain", str(theirs))])
        assert n.result().default_time2retain == theirs
    else:
        with pytest.raises(NegotiationError, match="above our offer"):
            n.receive([("DefaultTime2Retain", str(theirs))])
    if theirs >= ours:
        m.receive([("DefaultTime2Wait", str(theirs))])
        assert m.result().default_time2wait == theirs
    else:
        with pytest.raises(NegotiationError, match="below our offer"):
            m.receive([("DefaultTime2Wait", str(theirs))])


@given(st.lists(st.sampled_from(["CRC32C", "None"]), min_size=1, max_size=2, unique=True),
       st.sampled_from(["CRC32C", "None", "MD5", "X-vendor.digest", "crc32c"]))
def test_list_answer_must_be_one_we_offered(ours: list[str], theirs: str) -> None:
    n = offered("DataDigest", ",".join(ours))
    if theirs in ours:
        n.receive([("DataDigest", theirs)])
        assert n.result().data_digest == theirs
    else:
        with pytest.raises(NegotiationError, match=f"DataDigest={theirs}, outside"):
            n.receive([("DataDigest", theirs)])


# -- negotiation: the target proposes

PROPOSALS = [
    # key, theirs, our reply (None: none due), result, chosen_by
    ("HeaderDigest", "CRC32C,None", "CRC32C", "CRC32C", "target"),
    ("HeaderDigest", "None", "None", "None", "both"),
    ("HeaderDigest", "MD5,CRC32C", "CRC32C", "CRC32C", "initiator"),
    ("DataDigest", "MD5", "Reject", "None", "default"),
    ("TaskReporting", "FastAbort,RFC3720", "RFC3720", "RFC3720", "initiator"),
    ("TaskReporting", "ResponseFence", "Reject", "RFC3720", "default"),
    ("MaxBurstLength", "65536", "65536", "65536", "target"),
    ("MaxBurstLength", "100", "Reject", "262144", "default"),
    ("MaxBurstLength", "lots", "Reject", "262144", "default"),
    ("MaxConnections", "4", "1", "1", "initiator"),
    ("MaxConnections", "1", "1", "1", "both"),
    ("ErrorRecoveryLevel", "2", "0", "0", "initiator"),
    ("iSCSIProtocolLevel", "2", "1", "1", "initiator"),
    ("iSCSIProtocolLevel", "0", "0", "0", "target"),
    ("DefaultTime2Wait", "7", "7", "7", "target"),
    ("DefaultTime2Wait", "0", "0", "0", "both"),
    ("DefaultTime2Retain", "0", "0", "0", "target"),
    ("MaxOutstandingR2T", "16", "16", "16", "target"),
    ("ImmediateData", "No", None, "No", "target"),  # 6.2.2: AND with No needs no answer
    ("ImmediateData", "Yes", "Yes", "Yes", "both"),
    ("ImmediateData", "maybe", "Reject", "Yes", "default"),
    ("InitialR2T", "Yes", None, "Yes", "target"),  # 6.2.2: OR with Yes needs no answer
    ("InitialR2T", "No", "No", "No", "both"),
    ("DataPDUInOrder", "No", "Yes", "Yes", "initiator"),
    ("DataSequenceInOrder", "Yes", None, "Yes", "both"),
]


@pytest.mark.parametrize("key, theirs, reply, value, by", PROPOSALS)
def test_target_proposal_is_answered(key: str, theirs: str, reply: str | None, value: str,
                                     by: str) -> None:
    n = Negotiator()
    expected = [] if reply is None else [(key, reply)]
    assert n.receive([(key, theirs)]) == expected
    result = n.result()
    assert getattr(result, ATTR[key]) == typed(key, value)
    assert result.chosen_by[key] == by


def test_our_stance_can_be_changed() -> None:
    n = Negotiator(stance={"MaxBurstLength": "65536", "HeaderDigest": "CRC32C"})
    assert n.receive([("MaxBurstLength", "262144"), ("HeaderDigest", "None,CRC32C")]) == [
        ("MaxBurstLength", "65536"), ("HeaderDigest", "CRC32C")]
    with pytest.raises(ConfigError):
        Negotiator(stance={"MaxBurstLength": "1"})


@pytest.mark.parametrize("key, value", [
    ("OFMarker", "Yes"), ("IFMarker", "No"), ("OFMarkInt", "2048~8192"),
    ("IFMarkInt", "1~65535"),
])
def test_obsolete_marker_keys_are_rejected(key: str, value: str) -> None:
    assert Negotiator().receive([(key, value)]) == [(key, "Reject")]  # 13.26


@pytest.mark.parametrize("key", ["FooBar", "X-com.example.feature", "X#SomethingNew",
                                 "CHAPX"])
def test_unknown_and_extension_keys_are_not_understood(key: str) -> None:
    n = Negotiator()
    assert n.receive([(key, "1")]) == [(key, "NotUnderstood")]
    assert n.not_understood == [key]


def test_target_declarations_are_recorded() -> None:
    n = Negotiator()
    assert n.receive([
        ("TargetPortalGroupTag", "1"), ("TargetAlias", "disk \u00e9 one"),
        ("MaxRecvDataSegmentLength", "65536"), ("TargetAddress", "10.0.0.1:3260,1"),
        ("TargetAddress", "[fe80::1]:3260,1"), ("X#NodeArchitecture", "ExampleOS/1"),
    ]) == []
    r = n.result()
    assert (r.target_portal_group_tag, r.target_alias) == (1, "disk \u00e9 one")
    assert r.max_xmit_data_segment_length == 65536
    assert r.max_recv_data_segment_length == 8192  # we never declared ours
    assert r.chosen_by["MaxXmitDataSegmentLength"] == "target"
    assert r.chosen_by["MaxRecvDataSegmentLength"] == "default"
    assert r.chosen_by["TargetPortalGroupTag"] == r.chosen_by["TargetAlias"] == "target"
    assert n.target_addresses == ["10.0.0.1:3260,1", "[fe80::1]:3260,1"]
    assert n.target_declarations == {"X#NodeArchitecture": "ExampleOS/1"}


def test_our_declaration_and_the_targets_are_separate() -> None:
    n = offered("MaxRecvDataSegmentLength", "262144")
    assert n.outstanding() == set()  # declarative: nothing to wait for
    n.receive([("MaxRecvDataSegmentLength", "8192")])
    r = n.result()
    assert (r.max_recv_data_segment_length, r.max_xmit_data_segment_length) == (262144, 8192)
    assert r.chosen_by["MaxRecvDataSegmentLength"] == "initiator"


@pytest.mark.parametrize("value", ["511", "16777216", "0", "8k", "Reject"])
def test_declared_max_recv_data_segment_length_out_of_range(value: str) -> None:
    with pytest.raises(NegotiationError,
                       match=rf"MaxRecvDataSegmentLength={value}, not a number in "
                             r"512\.\.16777215"):
        Negotiator().receive([("MaxRecvDataSegmentLength", value)])


@pytest.mark.parametrize("value", ["512", "16777215", "0x200"])
def test_declared_max_recv_data_segment_length_in_range(value: str) -> None:
    n = Negotiator()
    n.receive([("MaxRecvDataSegmentLength", value)])
    assert n.result().max_xmit_data_segment_length == parse_number(value)


def test_target_portal_group_tag_range() -> None:
    with pytest.raises(NegotiationError, match=r"TargetPortalGroupTag=65536.*0\.\.65535"):
        Negotiator().receive([("TargetPortalGroupTag", "65536")])


# -- negotiation: what the target must not do


@pytest.mark.parametrize("key", ["InitiatorName", "SessionType", "SendTargets",
                                 "InitiatorAlias"])
def test_initiator_only_keys_from_the_target(key: str) -> None:
    with pytest.raises(NegotiationError, match=f"target sent {key}=x, a key only an "
                                               "initiator sends"):
        Negotiator().receive([(key, "x")])


def test_target_name_in_a_login_response() -> None:
    with pytest.raises(NegotiationError, match="only in a SendTargets answer"):
        Negotiator().receive([("TargetName", "iqn.2024-01.org.example:t")])


@pytest.mark.parametrize("value", ["Reject", "Irrelevant", "NotUnderstood"])
@pytest.mark.parametrize("key", ["MaxBurstLength", "HeaderDigest", "FooBar", "OFMarker"])
def test_an_answer_to_a_key_we_never_offered(key: str, value: str) -> None:
    with pytest.raises(NegotiationError, match=f"{key}={value}, but we never offered {key}"):
        Negotiator().receive([(key, value)])


def test_reserved_values_inside_a_proposal() -> None:
    with pytest.raises(NegotiationError, match="only answer a key"):
        Negotiator().receive([("HeaderDigest", "CRC32C,Reject")])


def test_a_key_twice_is_refused_within_and_across_texts() -> None:
    n = offered("MaxBurstLength", "262144")
    with pytest.raises(NegotiationError, match="target sent MaxBurstLength twice"):
        n.receive([("MaxBurstLength", "8192"), ("MaxBurstLength", "8192")])
    n = Negotiator()
    n.receive([("TargetPortalGroupTag", "1")])  # security stage
    with pytest.raises(NegotiationError, match="TargetPortalGroupTag twice"):
        n.receive([("TargetPortalGroupTag", "1")])  # operational stage
    n = Negotiator()
    n.receive([("HeaderDigest", "None")])
    with pytest.raises(NegotiationError, match="twice"):
        n.receive([("HeaderDigest", "None")])
    n = Negotiator()
    n.receive([("FooBar", "1")])
    with pytest.raises(NegotiationError, match="twice"):
        n.receive([("FooBar", "1")])


def test_security_keys_outside_the_security_stage() -> None:
    with pytest.raises(NegotiationError, match="AuthMethod=CHAP outside the security"):
        Negotiator().receive([("AuthMethod", "CHAP")])
    response = "0x" + "5e" * 16
    with pytest.raises(NegotiationError, match="CHAP_R outside the CHAP exchange") as info:
        Negotiator().receive([("CHAP_R", response)])
    assert response not in str(info.value)
    with pytest.raises(NegotiationError, match="CHAP_C outside") as info:
        Negotiator().receive([("CHAP_C", response), ("CHAP_C", response)])
    assert response not in str(info.value)


def test_auth_method_offered_through_the_negotiator_is_a_list() -> None:
    n = offered("AuthMethod", "CHAP,None")
    n.receive([("AuthMethod", "None")])
    with pytest.raises(NegotiationError, match=r"AuthMethod=KRB5, outside .*\(CHAP\)"):
        offered("AuthMethod", "CHAP").receive([("AuthMethod", "KRB5")])


# -- negotiation: bookkeeping


def test_outstanding_leaves_out_declarations_and_decided_booleans() -> None:
    n = Negotiator()
    for key, value in [("MaxRecvDataSegmentLength", "262144"), ("ImmediateData", "No"),
                       ("InitialR2T", "Yes"), ("DataPDUInOrder", "Yes"),
                       ("MaxBurstLength", "262144"), ("HeaderDigest", "None")]:
        n.offer(key, value)
    assert n.outstanding() == set()  # nothing sent yet
    n.take_offers()
    assert n.outstanding() == {"MaxBurstLength", "HeaderDigest"}
    assert n.take_offers() == []
    n.receive([("HeaderDigest", "None")])
    assert n.outstanding() == {"MaxBurstLength"}
    r = n.result()  # never answered: the default holds, with a warning
    assert r.max_burst_length == 262144 and r.chosen_by["MaxBurstLength"] == "default"
    assert any("never answered MaxBurstLength" in w for w in n.warnings)
    assert (r.immediate_data, r.initial_r2t, r.data_pdu_in_order) == (False, True, True)
    assert r.chosen_by["ImmediateData"] == r.chosen_by["InitialR2T"] == "initiator"


def test_not_understood_of_a_standard_key_warns() -> None:
    n = offered("MaxBurstLength", "65536")
    n.receive([("MaxBurstLength", "NotUnderstood")])
    assert n.result().max_burst_length == 262144
    assert any("NotUnderstood" in w for w in n.warnings)


def test_defaults_when_nothing_is_negotiated() -> None:
    r = Negotiator().result()
    assert r == Negotiated(
        header_digest="None", data_digest="None", max_connections=1, initial_r2t=True,
        immediate_data=True, max_recv_data_segment_length=8192,
        max_xmit_data_segment_length=8192, max_burst_length=262144,
        first_burst_length=65536, default_time2wait=2, default_time2retain=20,
        max_outstanding_r2t=1, data_pdu_in_order=True, data_sequence_in_order=True,
        error_recovery_level=0, target_portal_group_tag=None, target_alias=None,
        iscsi_protocol_level=1, task_reporting="RFC3720",
        chosen_by=dict.fromkeys(RESULT_KEYS, "default"))


def test_first_burst_above_max_burst_is_the_targets_error() -> None:
    n = Negotiator()
    n.offer("MaxBurstLength", "262144")
    n.offer("FirstBurstLength", "65536")
    n.take_offers()
    n.receive([("MaxBurstLength", "16384"), ("FirstBurstLength", "65536")])
    with pytest.raises(NegotiationError,
                       match="FirstBurstLength=65536 above MaxBurstLength=16384"):
        n.result()


def test_default_first_burst_is_lowered_to_max_burst() -> None:
    n = offered("MaxBurstLength", "262144")
    n.receive([("MaxBurstLength", "16384")])
    r = n.result()
    assert (r.max_burst_length, r.first_burst_length) == (16384, 16384)
    assert any("FirstBurstLength 65536 lowered" in w for w in n.warnings)


def test_first_burst_is_irrelevant_without_unsolicited_data() -> None:
    n = Negotiator()
    for key, value in [("InitialR2T", "Yes"), ("ImmediateData", "No"),
                       ("MaxBurstLength", "262144"), ("FirstBurstLength", "65536")]:
        n.offer(key, value)
    n.take_offers()
    n.receive([("MaxBurstLength", "8192"), ("FirstBurstLength", "65536")])
    assert n.result().first_burst_length == 8192  # 13.14: irrelevant, no error


def test_our_own_offers_must_be_coherent() -> None:
    n = Negotiator()
    n.offer("FirstBurstLength", "524288")  # above the default MaxBurstLength
    with pytest.raises(ConfigError, match="FirstBurstLength=524288 above MaxBurstLength"):
        n.take_offers()
    n = Negotiator()
    n.offer("ErrorRecoveryLevel", "1")
    n.offer("MaxOutstandingR2T", "4")
    with pytest.raises(ConfigError, match="must then be 1"):
        n.take_offers()


def test_erl_with_sequence_in_order_needs_one_r2t() -> None:
    n = Negotiator()
    for key, value in [("ErrorRecoveryLevel", "1"), ("DataSequenceInOrder", "No"),
                       ("MaxOutstandingR2T", "4")]:
        n.offer(key, value)
    n.take_offers()
    n.receive([("ErrorRecoveryLevel", "1"), ("DataSequenceInOrder", "Yes"),
               ("MaxOutstandingR2T", "4")])
    with pytest.raises(NegotiationError, match=r"MaxOutstandingR2T=4 .* 13\.19"):
        n.result()


def test_a_proposal_before_our_offer_went_out_takes_our_offer_as_stance() -> None:
    n = Negotiator()
    n.offer("MaxBurstLength", "65536")
    assert n.receive([("MaxBurstLength", "262144")]) == [("MaxBurstLength", "65536")]
    assert n.take_offers() == []
    assert n.result().max_burst_length == 65536


def test_an_offer_after_the_target_settled_the_key_is_dropped() -> None:
    n = Negotiator()
    n.receive([("HeaderDigest", "None")])
    n.offer("HeaderDigest", "CRC32C,None")
    assert n.take_offers() == []
    assert n.result().header_digest == "None"
    assert any("settled by the target" in w for w in n.warnings)


@pytest.mark.parametrize("key, value, match", [
    ("NoSuchKey", "1", "not a key this initiator negotiates"),
    ("X-com.example.k", "1", "not a key this initiator negotiates"),
    ("TargetAlias", "x", "only a target sends it"),
    ("TargetPortalGroupTag", "1", "only a target sends it"),
    ("CHAP_A", "5", "CHAP exchange"),
    ("OFMarker", "No", "obsolete"),
    ("SendTargets", "All", "full feature phase"),
    ("MaxBurstLength", "511", r"512\.\.16777215"),
    ("MaxBurstLength", "lots", "not a number"),
    ("DefaultTime2Wait", "3601", r"0\.\.3600"),
    ("ErrorRecoveryLevel", "3", r"0\.\.2"),
    ("HeaderDigest", "MD5", "'MD5' is not one of CRC32C,None"),
    ("HeaderDigest", "CRC32C,Reject", "only answer a key"),
    ("HeaderDigest", "", "is not one of"),
    ("AuthMethod", "SRP", "not one of CHAP,None"),
    ("TaskReporting", "FastAbort", "not one of RFC3720"),
    ("MaxBurstLength", "Irrelevant", "only answer a key"),
    ("ImmediateData", "yes", "Yes or No"),
    ("SessionType", "Discovery", "SessionType=Discovery on a Normal session"),
    ("SessionType", "Other", "one of Discovery,Normal"),
    ("InitiatorAlias", "a" * 256, "limit of 255"),
])
def test_offer_refuses_what_we_must_not_send(key: str, value: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        Negotiator().offer(key, value)


def test_offer_twice_is_refused() -> None:
    n = Negotiator()
    n.offer("MaxBurstLength", "0x10000")
    with pytest.raises(ConfigError, match="offered twice"):
        n.offer("MaxBurstLength", "65536")
    assert n.take_offers() == [("MaxBurstLength", "65536")]  # numbers go out in decimal
    with pytest.raises(ConfigError, match="offered twice"):
        n.offer("MaxBurstLength", "65536")


def test_unknown_session_type() -> None:
    with pytest.raises(ConfigError, match="Normal or Discovery"):
        Negotiator(session_type="Boot")


# -- discovery sessions and further connections


@pytest.mark.parametrize("key", [k for k, s in KEYS.items() if s.irrelevant_in_discovery])
def test_discovery_session_keys_that_are_irrelevant(key: str) -> None:
    n = Negotiator(session_type="Discovery")
    with pytest.raises(ConfigError, match="irrelevant there"):
        n.offer(key, KEYS[key].default)
    proposal = "1" if KEYS[key].lo is not None else KEYS[key].default
    assert n.receive([(key, proposal)]) == [(key, "Irrelevant")]
    assert n.result().chosen_by[key] == "default"


def test_discovery_session_negotiates_what_matters_there() -> None:
    n = Negotiator(session_type="Discovery")
    for key, value in [("HeaderDigest", "None"), ("DataDigest", "None"),
                       ("MaxRecvDataSegmentLength", "262144"), ("DefaultTime2Wait", "2"),
                       ("DefaultTime2Retain", "0"), ("ErrorRecoveryLevel", "0")]:
        n.offer(key, value)
    n.take_offers()
    n.receive([("HeaderDigest", "None"), ("DataDigest", "None"),
               ("DefaultTime2Wait", "2"), ("DefaultTime2Retain", "0"),
               ("ErrorRecoveryLevel", "0"), ("MaxRecvDataSegmentLength", "32768")])
    r = n.result()
    assert (r.default_time2retain, r.max_xmit_data_segment_length) == (0, 32768)
    assert n.outstanding() == set()


def test_further_connection_refuses_leading_only_keys() -> None:
    n = Negotiator(leading=False)
    with pytest.raises(ConfigError, match="leading-only"):
        n.offer("MaxBurstLength", "65536")
    n.offer("HeaderDigest", "CRC32C")  # connection-scoped: fine
    n.take_offers()
    n.receive([("HeaderDigest", "CRC32C")])
    with pytest.raises(NegotiationError, match="InitialR2T=Yes on a further connection"):
        n.receive([("InitialR2T", "Yes")])


# -- a whole login, as userland/login/machine.py drives it


def test_a_typical_login_exchange() -> None:
    n = Negotiator()
    n.receive([("TargetPortalGroupTag", "1")])  # security stage answer
    n.offer("HeaderDigest", "CRC32C,None")
    n.offer("DataDigest", "None")
    for key, value in [("MaxConnections", "1"), ("InitialR2T", "No"),
                       ("ImmediateData", "Yes"), ("MaxRecvDataSegmentLength", "262144"),
                       ("MaxBurstLength", "16776192"), ("FirstBurstLength", "262144"),
                       ("DefaultTime2Wait", "2"), ("DefaultTime2Retain", "0"),
                       ("MaxOutstandingR2T", "1"), ("DataPDUInOrder", "Yes"),
                       ("DataSequenceInOrder", "Yes"), ("ErrorRecoveryLevel", "0")]:
        n.offer(key, value)
    sent = n.take_offers()
    assert [k for k, _ in sent][:3] == ["HeaderDigest", "DataDigest", "MaxConnections"]
    # What a Linux LIO target answers, split over two Login Responses.
    assert n.receive([("HeaderDigest", "None"), ("DataDigest", "None"),
                      ("MaxConnections", "1"), ("InitialR2T", "Yes"),
                      ("ImmediateData", "Yes"), ("MaxRecvDataSegmentLength", "8192")]) == []
    assert n.receive([("MaxBurstLength", "262144"), ("FirstBurstLength", "65536"),
                      ("DefaultTime2Wait", "2"), ("DefaultTime2Retain", "0"),
                      ("MaxOutstandingR2T", "1"), ("DataPDUInOrder", "Yes"),
                      ("DataSequenceInOrder", "Yes"), ("ErrorRecoveryLevel", "0"),
                      ("X-com.example.hint", "1")]) == [("X-com.example.hint",
                                                          "NotUnderstood")]
    assert n.outstanding() == set()
    r = n.result()
    assert (r.header_digest, r.initial_r2t, r.max_burst_length, r.first_burst_length) == (
        "None", True, 262144, 65536)
    assert (r.max_recv_data_segment_length, r.max_xmit_data_segment_length) == (262144, 8192)
    assert r.target_portal_group_tag == 1
    assert r.chosen_by["HeaderDigest"] == "target"
    assert r.chosen_by["InitialR2T"] == "target"
    assert r.chosen_by["ImmediateData"] == "initiator"
    assert r.chosen_by["DefaultTime2Retain"] == "initiator"
    assert r.chosen_by["TaskReporting"] == "default"
    assert not n.warnings


# -- whatever a target sends, only our own errors come out

_VALUES = st.one_of(
    st.sampled_from(["Yes", "No", "None", "CRC32C", "Reject", "Irrelevant",
                     "NotUnderstood", "0", "1", "512", "8192", "65535", "65536",
                     "16777215", "0x10", "RFC3720", "CHAP", ""]),
    st.text(max_size=12),
)


@given(st.lists(st.tuples(st.one_of(st.sampled_from(_KNOWN), keys), _VALUES), max_size=12),
       st.sampled_from(["Normal", "Discovery"]))
def test_any_target_text_gives_answers_or_a_negotiation_error(pairs: list[Pair],
                                                              session_type: str) -> None:
    n = Negotiator(session_type=session_type)
    n.offer("HeaderDigest", "CRC32C,None")
    n.offer("MaxRecvDataSegmentLength", "65536")
    n.offer("DefaultTime2Wait", "2")
    if session_type == "Normal":
        n.offer("MaxBurstLength", "262144")
        n.offer("ImmediateData", "Yes")
    n.take_offers()
    try:
        replies = n.receive(pairs)
        result = n.result()
    except NegotiationError:
        return
    assert decode_text(encode_text(replies)) == replies
    assert set(result.chosen_by.values()) <= {"default", "initiator", "target", "both"}
    assert result.first_burst_length <= result.max_burst_length
    assert 512 <= result.max_xmit_data_segment_length < 2**24
