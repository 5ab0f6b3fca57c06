"""What SET_PARAM tells the kernel after a bind: session facts, negotiated values, timers.

Pure data: a list of (param, value, optional) built from a login's result, applied in
order by handoff.py and again by recovery.py after each relogin. ``optional`` marks the
parameters iscsi_tcp may not implement (markers, ISID, fast abort: -ENOSYS there).

Why each one matters (notes/kernel-iscsi-if.md): MAX_RECV_DLENGTH must be what our login
declared (the kernel's default is 8192), MAX_XMIT_DLENGTH must be set (default 0 stalls
writes), FIRST/MAX_BURST, INITIAL_R2T_EN and IMM_DATA_EN follow the target's answers,
EXP_STATSN is the last login StatSN + 1; TARGET_NAME, PERSISTENT_ADDRESS/PORT and TPGT
fill sysfs, from which udev builds /dev/disk/by-path.
"""

from __future__ import annotations

from dataclasses import dataclass

from kernel_handoff.uevent import Param
from userland.errors import ProtocolError
from userland.login.machine import LoginResult

ParamValue = str | int | bool
IFACE_NAME = "iscsi-handoff"


@dataclass(frozen=True)
class SessionTimers:
    """open-iscsi's node.session.* timers, with its defaults (seconds)."""

    replacement_timeout: int = 120  # SESS_RECOVERY_TMO: queued I/O waits this long
    noop_out_interval: int = 5  # RECV_TMO: idle time before the kernel pings the target
    noop_out_timeout: int = 5  # PING_TMO: how long the ping may go unanswered
    abort_timeout: int = 15
    lu_reset_timeout: int = 30
    tgt_reset_timeout: int = 30


@dataclass(frozen=True)
class SessionFacts:
    """What sysfs shows about the session, set once per bind."""

    target_name: str
    initiator_name: str
    address: str  # the portal's numeric address, as udev's by-path names it
    port: int
    isid: bytes


def recovery_timeout_param(timers: SessionTimers) -> tuple[Param, ParamValue, bool]:
    # The one parameter the kernel takes before a bind (the session's, not the conn's).
    return Param.SESS_RECOVERY_TMO, timers.replacement_timeout, False


def connection_params(result: LoginResult, facts: SessionFacts,
                      timers: SessionTimers) -> list[tuple[Param, ParamValue, bool]]:
    """Every SET_PARAM after BIND_CONN, in the order iscsid sends them."""
    neg = result.negotiated
    if neg.error_recovery_level != 0:
        # iscsi_tcp implements ERL 0 only; our login offers 0, so a target answering
        # more broke the negotiation rules (the minimum of 0 and anything is 0).
        raise ProtocolError(f"ErrorRecoveryLevel {neg.error_recovery_level} negotiated; "
                            "the kernel's iscsi_tcp supports 0 only")
    out: list[tuple[Param, ParamValue, bool]] = [
        (Param.TARGET_NAME, facts.target_name, False),
        (Param.PERSISTENT_ADDRESS, facts.address, False),
        (Param.PERSISTENT_PORT, facts.port, False),
        (Param.INITIATOR_NAME, facts.initiator_name, False),
        # Our own iface name marks the session as not iscsid's: iscsiadm then neither
        # counts it against a node's sessions nor does iscsid adopt it on a restart
        # (both match sessions to node records by target, portal and iface).
        (Param.IFACE_NAME, IFACE_NAME, True),
        (Param.ISID, facts.isid.hex(), True),
        (Param.ABORT_TMO, timers.abort_timeout, False),
        (Param.LU_RESET_TMO, timers.lu_reset_timeout, False),
        (Param.TGT_RESET_TMO, timers.tgt_reset_timeout, False),
        (Param.PING_TMO, timers.noop_out_timeout, False),
        (Param.RECV_TMO, timers.noop_out_interval, False),
        (Param.FAST_ABORT, True, True),
        # negotiated
        (Param.MAX_RECV_DLENGTH, neg.max_recv_data_segment_length, False),
        (Param.MAX_XMIT_DLENGTH, neg.max_xmit_data_segment_length, False),
        (Param.HDRDGST_EN, neg.header_digest == "CRC32C", False),
        (Param.DATADGST_EN, neg.data_digest == "CRC32C", False),
        (Param.INITIAL_R2T_EN, neg.initial_r2t, False),
        (Param.MAX_R2T, neg.max_outstanding_r2t, False),
        (Param.IMM_DATA_EN, neg.immediate_data, False),
        (Param.FIRST_BURST, neg.first_burst_length, False),
        (Param.MAX_BURST, neg.max_burst_length, False),
        (Param.PDU_INORDER_EN, neg.data_pdu_in_order, False),
        (Param.DATASEQ_INORDER_EN, neg.data_sequence_in_order, False),
        (Param.ERL, neg.error_recovery_level, False),
        (Param.IFMARKER_EN, False, True),
        (Param.OFMARKER_EN, False, True),
        (Param.EXP_STATSN, result.exp_stat_sn, False),
    ]
    if neg.target_portal_group_tag is not None:
        out.append((Param.TPGT, neg.target_portal_group_tag, False))
    if neg.target_alias:
        out.append((Param.TARGET_ALIAS, neg.target_alias, True))
    return out
