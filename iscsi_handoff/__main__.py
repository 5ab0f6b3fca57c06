"""`python -m iscsi_handoff` runs the CLI."""

from iscsi_handoff.cli import main

main()
