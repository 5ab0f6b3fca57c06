"""iscsi-handoff: the front door (CLI, configuration, choice of data path)."""

__version__ = "0.1.0"
