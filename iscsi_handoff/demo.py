"""`iscsi-handoff demo`: the whole tour against a throwaway tgtd on 127.0.0.1:
discovery, a checked login, then the data path this machine has, with ext4 on it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import click

from iscsi_handoff.demo_data import data_tour
from iscsi_handoff.identity import initiator_name
from iscsi_handoff.output import print_login, print_targets
from userland.discovery.run import discover
from userland.exchange import Exchange
from userland.login.machine import LoginConfig, new_isid
from userland.login.run import login
from userland.portal import Portal

DEMO_TARGET = "iqn.2024-01.org.iscsi-handoff.demo:disk1"
DEMO_SIZE = 64 << 20


@contextlib.contextmanager
def demo_target() -> Iterator[tuple[Portal, str]]:
    """A tgtd with one 64 MiB LUN on a free loopback port, gone afterwards."""
    from iscsi_handoff.tgtlab import LunSpec, Tgt

    with Tgt() as tgt:
        tgt.add_target(DEMO_TARGET, luns=[LunSpec(size=DEMO_SIZE)])
        click.echo(f"demo: started tgtd on {tgt.portal} with {DEMO_TARGET} "
                   f"(LUN 1, {DEMO_SIZE >> 20} MiB)")
        yield Portal.parse(tgt.portal), DEMO_TARGET
    click.echo("demo: stopped tgtd")


def run_demo(portal: Portal | None, target: str | None) -> None:
    with contextlib.ExitStack() as stack:
        if portal is None:
            portal, target = stack.enter_context(demo_target())
        name = initiator_name()
        click.echo(f"\n$ iscsi-handoff discover {portal}")
        targets = discover(portal, initiator_name=name)
        print_targets(targets, as_json=False)
        if target is None:
            if not targets:
                click.echo("demo: the portal lists no targets; nothing to log in to")
                return
            target = targets[0].name
        click.echo(f"\n$ iscsi-handoff login --portal {portal} --target {target} --check")
        session = login(portal, LoginConfig(initiator_name=name, target_name=target,
                                            isid=new_isid()))
        with session.connection:
            Exchange(session.connection, session.result).logout(timeout=15)
        print_login(session.result, target=target, portal=session.portal)
        click.echo("logged out")
        data_tour(str(portal), target)
        click.echo("")
