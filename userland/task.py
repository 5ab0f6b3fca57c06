"""One SCSI command as the session carries it: what was asked, what came back."""

from __future__ import annotations

from dataclasses import dataclass, field

from userland.pdu import RESERVED_TAG

Buffer = bytes | bytearray | memoryview


@dataclass(eq=False)
class Task:
    lun: int  # the 64-bit LUN field as it goes on the wire (see scsi.int_to_lun)
    cdb: bytes
    read_length: int = 0  # expected Data-In bytes
    write_data: Buffer | None = None  # the Data-Out payload
    # -- filled in by the session
    itt: int = RESERVED_TAG
    cmd_sn: int = 0
    data: bytearray = field(default_factory=bytearray)  # Data-In lands here
    received: int = 0
    status: int | None = None
    response: int = 0
    sense: bytes = b""
    residual: int = 0  # > 0 underflow (short), < 0 overflow
    done: bool = False
    error: str | None = None  # set when the task failed outside SCSI (session lost)
    attempts: int = 0  # times issued; bounded by policy.Bounds.max_attempts
    queued_at: float = 0.0  # when it last joined the line to be issued
    sent_at: float | None = None  # when this attempt went to the connection
    # -- per-attempt protocol state
    exp_data_sn: int = 0
    exp_r2t_sn: int = 0
    write_sent: int = 0  # bytes of Data-Out sent so far, solicited or not

    @property
    def write_length(self) -> int:
        return len(self.write_data) if self.write_data is not None else 0

    def reset_attempt(self) -> None:
        """Forget a failed attempt's progress before it is issued again."""
        self.itt = RESERVED_TAG
        self.received = self.exp_data_sn = self.exp_r2t_sn = self.write_sent = 0
        self.status = None
        self.sense = b""
        self.residual = 0
        self.response = 0
        if self.read_length:
            self.data = bytearray(self.read_length)
