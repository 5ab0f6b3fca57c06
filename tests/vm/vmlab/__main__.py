"""scripts/vm/run: boot the guest and run the guest suite, or one file, or a shell.

    scripts/vm/run                          the whole guest suite (tests/vm/guest)
    scripts/vm/run -k chap -x               extra pytest arguments
    scripts/vm/run tests/vm/guest/test_lab.py   one file (or file::test)
    scripts/vm/run --shell                  a shell in the guest on this terminal
    scripts/vm/run --exec CMD ARGS...       any command in the guest, from the repo root
    scripts/vm/run --prepare                fetch the kernel, build the initramfs, stop

Exit status: the guest job's own (pytest's), or 9 when the lab cannot run, 1 when the
guest never reported one.
"""

from __future__ import annotations

import sys

from userland.errors import EXIT_INTERNAL, EXIT_USAGE

from . import boot
from .common import LabError

USAGE = __doc__ or ""


def main(argv: list[str]) -> int:
    timeout = boot.DEFAULT_TIMEOUT
    mode = "suite"
    while argv and argv[0] in ("--shell", "--exec", "--prepare", "--timeout", "-h",
                               "--help"):
        opt = argv.pop(0)
        if opt in ("-h", "--help"):
            print(USAGE.strip())
            return 0
        if opt == "--timeout":
            if not argv or not argv[0].replace(".", "", 1).isdigit():
                print("vmlab: --timeout needs a number of seconds", file=sys.stderr)
                return EXIT_USAGE
            timeout = float(argv.pop(0))
        else:
            mode = opt[2:]
            if mode == "exec":
                break
    try:
        if mode == "prepare":
            kernel, initramfs = boot.prepare(print)
            print(f"vmlab: kernel {kernel.vmlinuz}")
            print(f"vmlab: initramfs {initramfs.path} ({len(initramfs.plan.order)} modules; "
                  f"absent: {', '.join(initramfs.plan.absent) or 'none'})")
            return 0
        why = boot.unavailable_reason()
        if why is not None:
            raise LabError(why)
        if mode == "shell":
            result = boot.run(["/bin/bash", "-l"], timeout=max(timeout, 3600),
                              interactive=True, echo=print)
        elif mode == "exec":
            if not argv:
                print("vmlab: --exec needs a command", file=sys.stderr)
                return EXIT_USAGE
            result = boot.run(argv, timeout=timeout, echo=print)
        else:
            # The whole suite takes three boots (boot.LATER_BOOTS); any argument, one.
            result = boot.run(boot.pytest_command(boot.suite_boots(argv)[0]),
                              timeout=timeout, echo=print)
            for more in boot.suite_boots(argv)[1:]:
                if result.problems():
                    break
                _report(result, mode)
                result = boot.run(boot.pytest_command(more), timeout=timeout, echo=print)
    except LabError as exc:
        print(f"vmlab: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("vmlab: interrupted", file=sys.stderr)
        return 130
    _report(result, mode)
    if result.status is None:
        return EXIT_INTERNAL
    return result.status


def _report(result: boot.RunResult, mode: str) -> None:
    boot_time = "?" if result.boot_seconds is None else f"{result.boot_seconds:.1f} s"
    print(f"vmlab: {result.release}: root ready after {boot_time}, "
          f"QEMU ran {result.seconds:.1f} s; status {result.status}; "
          f"artifacts in {result.run_dir}")
    if mode == "suite":
        for problem in result.problems():
            print(f"vmlab: {problem}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
