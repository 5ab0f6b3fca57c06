"""`iscsi-handoff doctor` in the guest: a stock kernel with iscsi_tcp offers the kernel path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

CLI = Path(sys.prefix) / "bin" / "iscsi-handoff"


def test_doctor_chooses_the_kernel_path() -> None:
    done = subprocess.run([str(CLI), "doctor", "--json"], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["kernel_release"] == os.uname().release
    assert report["paths"]["kernel"]["ok"], report["paths"]["kernel"]["reason"]
    assert report["chosen"] == "kernel", report["chosen_reason"]
