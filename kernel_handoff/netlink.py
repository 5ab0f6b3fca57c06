"""NETLINK_ISCSI (family 8) through pyroute2: requests, replies and kernel events.

pyroute2 owns the socket, the bind to the iscsid multicast group, the netlink header
(length, type, flags, sequence number, port id), the split of a datagram into messages
and the asyncio queue the datagrams land in. The family has no attributes: each message
is one ``struct iscsi_uevent`` and a tail, which ``iscsi_uevent_msg`` carries as opaque
bytes and kernel_handoff/uevent.py encodes and decodes.

How the kernel answers (scsi_transport_iscsi, seen on 6.1):
- a reply goes to the sender's port with the request's netlink type and sequence
  number 0, so replies are matched by type, one request outstanding at a time;
- events (CONN_ERROR, RECV_PDU, CREATE/DESTROY/UNBIND_SESSION) are multicast to group 1
  with netlink type 0; the CREATE_SESSION event can come before its request's reply,
  so whatever arrives while we wait is queued for ``next_event``;
- a successful GET_STATS has no reply of its own: the stats come as a type-0 message
  whose uevent type is GET_STATS;
- failures come as IF_ERROR with -errno in ``iferror``, or as a negative ``retcode``.

``IscsiNetlink`` is blocking (the handoff and the recovery loop are plain sequential
code), with every wait bounded; it drives pyroute2's asyncio socket on a private loop.

Who created a session (sysfs ``creator``) is the netlink port id CREATE_SESSION came
from; -1 (port id 0xFFFFFFFF) reads as "made by the kernel", and open-iscsi's iscsid
leaves such sessions alone at its startup sync (``iscsi_sysfs_session_user_created``)
instead of taking them over with STOP_CONN(RECOVER) and a login of its own. So our
CREATE_SESSION goes through ``kernel_port()``: a short-lived socket bound to that port
id. Only one socket per host can hold it, so our processes queue on a lock file and
retry on EADDRINUSE (a socket of someone else's); the socket is closed right after the
reply, and everything else goes through the keeper's own socket.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import fcntl
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from pyroute2.netlink import NLM_F_REQUEST, nlmsg
from pyroute2.netlink.nlsocket import AsyncNetlinkSocket, Marshal

from kernel_handoff import uevent as ue
from kernel_handoff.errors import KernelIscsiError, KernelUnavailable, NetlinkTimeout
from kernel_handoff.uevent import Event, KernelEvent, Request, RequestMsg, Uevent

log = logging.getLogger("iscsi_handoff.netlink")

NETLINK_ISCSI = 8
DEFAULT_TIMEOUT = 10.0  # a request the kernel handles in its sender's context: ms, normally
RCVBUF = 4 << 20  # RECV_PDU and stats bursts must not overflow into ENOBUFS
KERNEL_PORT_ID = 0xFFFFFFFF  # sysfs creator -1: "made by the kernel", iscsid's sync skips it
KERNEL_PORT_WAIT = 10.0  # for another process to let go of that port id
KERNEL_PORT_RETRY = 0.05


class iscsi_uevent_msg(nlmsg):  # type: ignore[misc]  # pyroute2's class naming
    """A NETLINK_ISCSI message: the netlink header, then the uevent bytes as they are."""

    fields = ()

    def ft_encode(self, offset: int) -> tuple[int, int]:
        payload = bytes(self["payload"])
        pad = -len(payload) & 3  # netlink aligns messages; nlmsg_len leaves the pad out
        self.data.extend(payload + bytes(pad))
        return offset + len(payload) + pad, pad

    def ft_decode(self, offset: int) -> None:
        self["payload"] = bytes(self.data[offset:self.offset + self.length])
        del self["attrs"]


class MarshalIscsi(Marshal):  # type: ignore[misc]
    """Every message type decodes as a raw uevent; the family never sends NLMSG_DONE."""

    default_message_class = iscsi_uevent_msg
    msg_map: dict[int, type] = {}  # noqa: RUF012  (pyroute2 copies it per instance)

    def is_enough(self, msg: Any) -> bool:
        return False


class AsyncIscsiSocket(AsyncNetlinkSocket):  # type: ignore[misc]
    marshal_class = MarshalIscsi

    def __init__(self, *, loop: asyncio.AbstractEventLoop,
                 use_socket: socket.socket | None = None) -> None:
        super().__init__(family=NETLINK_ISCSI, rcvbuf=RCVBUF, use_event_loop=loop,
                         use_socket=use_socket)


def open_error(exc: OSError) -> KernelUnavailable | KernelIscsiError:
    if exc.errno == errno.EPROTONOSUPPORT:
        return KernelUnavailable(
            "the kernel has no iSCSI transport: NETLINK_ISCSI is unsupported "
            "(EPROTONOSUPPORT; modprobe scsi_transport_iscsi iscsi_tcp, or use --fuse)")
    return KernelIscsiError("opening a NETLINK_ISCSI socket", exc.errno or errno.EIO)


def bound_socket(port_id: int, groups: int) -> socket.socket:
    """A NETLINK_ISCSI socket bound to ``port_id`` (pyroute2 0.9's ``bind(pid=N)``
    leaves the socket unbound, so we bind it ourselves). SOCK_DGRAM, as pyroute2 makes
    them (netlink treats it as SOCK_RAW; asyncio's datagram endpoint insists on it)."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_ISCSI)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        sock.bind((port_id, groups))
    except BaseException:
        sock.close()
        raise
    return sock


class IscsiNetlink:
    """A NETLINK_ISCSI socket bound to the iscsid group: request/reply, and events."""

    def __init__(self, *, timeout: float = DEFAULT_TIMEOUT,
                 groups: int = ue.ISCSI_NL_GRP_ISCSID,
                 port_id: int | None = None,
                 use_socket: socket.socket | None = None) -> None:
        """``port_id``: bind to this netlink port id (EADDRINUSE if taken) instead of a
        free one. ``use_socket`` (tests only): a datagram socket standing in for the
        kernel's side, used as is and not bound."""
        self.timeout = timeout
        self._loop = asyncio.new_event_loop()
        self._events: collections.deque[KernelEvent] = collections.deque()
        self._inbox: collections.deque[tuple[int, Uevent]] = collections.deque()
        self._pull: asyncio.Task[list[Any]] | None = None
        self._wake: asyncio.Future[None] | None = None
        self.stop_signal: int | None = None
        self._closed = False
        try:
            if port_id is not None:
                use_socket = bound_socket(port_id, groups)
            self._sock = AsyncIscsiSocket(loop=self._loop, use_socket=use_socket)
            if use_socket is None:
                # pid=None: pyroute2 picks a free port id, so two sockets in one process
                # never clash; the kernel replies to whichever port sent the request.
                self._loop.run_until_complete(self._sock.bind(groups=groups))
            else:
                self._loop.run_until_complete(self._sock.setup_endpoint())
        except OSError as exc:
            self._loop.close()
            raise open_error(exc) from None

    # -- lifecycle

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._pull is not None:
            self._pull.cancel()
            self._loop.run_until_complete(asyncio.gather(self._pull, return_exceptions=True))
        self._sock.close()
        self._loop.run_until_complete(self._loop.shutdown_asyncgens())
        self._loop.close()

    def __enter__(self) -> IscsiNetlink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def watch_signals(self, signums: Iterable[int] = (signal.SIGTERM, signal.SIGINT)) -> None:
        """Make these signals end any wait here: ``stop_signal`` says which came.

        A signal that arrives while we are not waiting (a relogin in progress) is seen
        at the next wait: asyncio keeps it in its wakeup pipe.
        """
        for signum in signums:
            self._loop.add_signal_handler(signum, self._on_signal, signum)

    def on_signal(self, signum: int, callback: Callable[[], None]) -> None:
        """Run ``callback`` when ``signum`` comes, during any wait here, without ending
        it (SIGHUP: a keeper lets go of its terminal and goes on keeping)."""
        self._loop.add_signal_handler(signum, callback)

    def _on_signal(self, signum: int) -> None:
        self.stop_signal = signum
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    # -- requests

    def request(self, req: RequestMsg, *, timeout: float | None = None) -> Uevent:
        """Send one request and return the kernel's reply; KernelIscsiError if refused."""
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        self._send(req)
        while True:
            reply = self._take_reply(req)
            if reply is not None:
                _check(req, reply)
                log.debug("netlink %s -> ok", req.what)
                return reply
            if not self._receive(deadline):
                raise NetlinkTimeout(req.what, limit)

    def _send(self, req: RequestMsg) -> None:
        msg = iscsi_uevent_msg()
        msg["payload"] = req.payload
        try:
            sent = self._loop.run_until_complete(
                self._sock.put(msg, msg_type=int(req.code), msg_flags=NLM_F_REQUEST,
                               msg_seq=None))
        except OSError as exc:
            raise KernelIscsiError(req.what, exc.errno or errno.EIO) from None
        # The kernel answers with sequence number 0: the per-request queue pyroute2
        # made for our sequence number would never fill, so give it back now.
        sent.cleanup()

    def _take_reply(self, req: RequestMsg | None) -> Uevent | None:
        """Sort what came in: our reply is returned, events queued, stale replies dropped."""
        while self._inbox:
            nl_type, ev = self._inbox.popleft()
            if nl_type == 0:
                if (req is not None and req.code == Request.GET_STATS
                        and ev.type == Request.GET_STATS):
                    f = ev.fields_u("get_stats")
                    if (f["sid"], f["cid"]) == (req.sid, req.cid):
                        return ev
                self._queue_event(ev)
                continue
            if req is not None and nl_type == int(req.code):
                return ev
            log.debug("netlink: dropping a late reply of type %d", nl_type)
        return None

    def _queue_event(self, ev: Uevent) -> None:
        try:
            event = ue.parse_event(ev)
        except ue.UeventDecodeError as exc:
            log.warning("netlink: ignoring a malformed %s event: %s", ev.type_name(), exc)
            return
        self._events.append(event)

    # -- events

    def next_event(self, timeout: float | None, *, interruptible: bool = True
                   ) -> KernelEvent | None:
        """The oldest queued event, waiting up to ``timeout`` s (None: no limit).

        None on timeout, or (``interruptible``) once a watched signal came: see
        ``stop_signal``. The teardown that follows a signal waits uninterruptibly.
        """
        if timeout is None and not interruptible:
            raise ValueError("an uninterruptible wait needs a timeout")
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._take_reply(None)
            if self._events:
                return self._events.popleft()
            if interruptible and self.stop_signal is not None:
                return None
            if not self._receive(deadline, interruptible=interruptible):
                return None

    def drain_events(self) -> list[KernelEvent]:
        """Whatever events are already here, without waiting."""
        while self._receive(time.monotonic()):
            pass
        self._take_reply(None)
        events = list(self._events)
        self._events.clear()
        return events

    def wait_for(self, match: Callable[[KernelEvent], bool], *, timeout: float,
                 what: str) -> KernelEvent:
        """The first event ``match`` accepts; the others stay queued, in order."""
        deadline = time.monotonic() + timeout
        skipped: list[KernelEvent] = []
        try:
            while True:
                event = self.next_event(max(0.0, deadline - time.monotonic()),
                                        interruptible=False)
                if event is None:
                    raise NetlinkTimeout(what, timeout)
                if match(event):
                    return event
                skipped.append(event)
        finally:
            self._events.extendleft(reversed(skipped))

    # -- receiving

    async def _pull_datagram(self) -> list[Any]:
        return [msg async for msg in self._sock.get(msg_seq=0)]

    def _receive(self, deadline: float | None, *, interruptible: bool = False) -> bool:
        """Move one datagram's messages into the inbox; False on timeout (or signal).

        The pull task outlives a timeout, so nothing is lost between calls.
        """
        if self._pull is None:
            self._pull = self._loop.create_task(self._pull_datagram())
        self._wake = self._loop.create_future()
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            waiting: set[asyncio.Future[Any]] = {self._pull}
            if interruptible:
                waiting.add(self._wake)
            done, _ = self._loop.run_until_complete(
                asyncio.wait(waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED))
        finally:
            self._wake.cancel()
            self._wake = None
        if self._pull not in done:
            return False
        task, self._pull = self._pull, None
        try:
            messages = task.result()
        except OSError as exc:  # ENOBUFS: the kernel dropped multicast we were too slow for
            log.warning("netlink: %s; kernel events may have been lost",
                        exc.strerror or exc)
            return True
        for msg in messages:
            try:
                self._inbox.append((int(msg["header"]["type"]), ue.decode(msg["payload"])))
            except ue.UeventDecodeError as exc:
                log.warning("netlink: ignoring a malformed message: %s", exc)
        return True


@contextlib.contextmanager
def kernel_port(lock: Path | None = None, *, wait: float = KERNEL_PORT_WAIT
                ) -> Iterator[IscsiNetlink]:
    """A socket on port id 0xFFFFFFFF for one CREATE_SESSION: its session reads creator
    -1, which iscsid leaves alone. ``lock`` (a file) queues our own processes; another
    holder of the port id is waited for, up to ``wait`` seconds."""
    with contextlib.ExitStack() as stack:
        deadline = time.monotonic() + wait
        if lock is not None:
            stack.enter_context(_flock(lock, deadline))
        while True:
            try:
                nl = IscsiNetlink(port_id=KERNEL_PORT_ID, groups=0)
                break
            except KernelIscsiError as exc:
                if exc.errno != errno.EADDRINUSE or time.monotonic() >= deadline:
                    raise KernelIscsiError(
                        "binding netlink port id 0xFFFFFFFF (for CREATE_SESSION)",
                        exc.errno, "another process holds it" if exc.errno ==
                        errno.EADDRINUSE else "") from None
                time.sleep(KERNEL_PORT_RETRY)
        with nl:
            yield nl


@contextlib.contextmanager
def _flock(path: Path, deadline: float) -> Iterator[None]:
    """An exclusive lock on ``path`` (made if missing), waited for until ``deadline``;
    released when the fd closes, so a process that dies holding it holds nothing."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise KernelIscsiError(f"opening the lock {path}", exc.errno or errno.EIO) from None
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise KernelIscsiError(f"taking the lock {path}", errno.EAGAIN,
                                           "another login holds it") from None
                time.sleep(KERNEL_PORT_RETRY)
        yield
    finally:
        os.close(fd)


def _check(req: RequestMsg, reply: Uevent) -> None:
    if reply.type == Event.IF_ERROR:
        raise KernelIscsiError(req.what, abs(reply.iferror) or errno.EIO)
    if req.code in ue.RETCODE_REQUESTS and reply.retcode < 0:
        raise KernelIscsiError(req.what, -reply.retcode)
