"""tests/vm/guest runs inside the VM lab's guest only (scripts/vm/run, or test_vm.py
from the host), never in the host's own pytest run: there it is not even collected."""

from __future__ import annotations

import os

IN_GUEST = os.environ.get("ISCSI_HANDOFF_VM") == "1"  # set by the lab's job.sh

collect_ignore = [] if IN_GUEST else ["guest"]
