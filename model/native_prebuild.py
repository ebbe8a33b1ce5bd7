"""Build the compiled decode step for CPU levels rather than for this CPU, into the package.

    python -m model.native_prebuild [--folder DIR] [--target x86-64-v4 ...]

The container image runs this in its build stage, which has a C compiler, so that the final
image (which has none) still runs the compiled step: at start-up model.native_decode builds for
the CPU it runs on where it can, and otherwise loads the best of these that the CPU supports.
A level the compiler cannot build for (an older gcc without AMX, say) is skipped with its
reason, and the others are still built. Without a C compiler, or on a CPU family these levels
do not name, nothing is built: it prints why and exits 1.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

from model.native_decode import PORTABLE_TARGETS, PREBUILT, NativeUnavailable, build_portable


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.native_prebuild", description=__doc__)
    parser.add_argument("--folder", type=Path, default=PREBUILT, help="default: %(default)s")
    parser.add_argument(
        "--target", action="append", choices=list(PORTABLE_TARGETS), help="default: all"
    )
    args = parser.parse_args(argv)
    if platform.machine().lower() not in ("x86_64", "amd64"):
        print(f"no portable builds for {platform.machine()}: the step compiles at start-up there")
        return 1
    built = 0
    for target in args.target or list(PORTABLE_TARGETS):
        try:
            path = build_portable(target, args.folder)
        except NativeUnavailable as exc:
            print(f"{target}: not built: {exc}", file=sys.stderr)
            continue
        built += 1
        print(f"{target}: {path} ({path.stat().st_size // 1024} KiB)")
    return 0 if built else 1


if __name__ == "__main__":
    sys.exit(main())
