"""Start-up cost of the ``optimum_rom_autoload.pth`` hook: the same commands with the ``.pth`` in
site-packages and moved away, interleaved, each in a fresh interpreter; median wall times::

    python benchmarks/autoload_startup.py --repeats 15

Moves the ``.pth`` of this environment aside during the runs (put back at the end, also on error).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

COMMANDS = {
    "python -c pass": "pass",
    "import torch": "import torch",
    "import transformers.modeling_utils": "import transformers.modeling_utils",
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    installed = Path(sysconfig.get_paths()["purelib"]) / "optimum_rom_autoload.pth"
    aside = installed.with_name("optimum_rom_autoload.pth.aside")
    if not installed.is_file():
        sys.exit(f"{installed} is not installed: pip install -e . first")
    seconds: dict[tuple[str, bool], list[float]] = {
        (name, hook): [] for name in COMMANDS for hook in (True, False)
    }
    try:
        for _ in range(args.repeats):
            for hook in (True, False):
                if hook and aside.exists():
                    aside.rename(installed)
                elif not hook and installed.exists():
                    installed.rename(aside)
                for name, code in COMMANDS.items():
                    started = time.perf_counter()
                    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")
                    seconds[(name, hook)].append(time.perf_counter() - started)
    finally:
        if aside.exists():
            aside.rename(installed)
    for name in COMMANDS:
        on, off = (statistics.median(seconds[(name, hook)]) * 1000 for hook in (True, False))
        print(f"{name:36s} with the hook {on:8.1f} ms, without {off:8.1f} ms, difference {on - off:+6.1f} ms")


if __name__ == "__main__":
    main()
