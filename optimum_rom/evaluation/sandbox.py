"""Running untrusted generated code: a separate Python process, a time limit, no network.

The evaluating process never executes model output. Each program runs in a fresh
``python -I`` (isolated mode: no user site, no environment-driven imports) in an empty
temporary directory, in its own process group (killed as a whole on timeout), with
CPU-time, memory and file-size limits. The network is cut twice: inside a private network
namespace when the kernel allows unprivileged ones (``unshare -rn``), and in any case by a
preamble that replaces the ``socket`` module's connect/bind entry points before the program
runs. This keeps honest-but-buggy programs (the HumanEval case) from hurting the machine; it is
not a security boundary against deliberately hostile code.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

_PREAMBLE = """\
import resource as _resource, socket as _socket
def _no_network(*args, **kwargs):
    raise OSError("network access is disabled in the optimum-rom sandbox")
for _name in ("socket", "create_connection", "create_server", "getaddrinfo", "socketpair", "fromfd"):
    setattr(_socket, _name, _no_network)
_resource.setrlimit(_resource.RLIMIT_AS, ({memory}, {memory}))
_resource.setrlimit(_resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
del _resource, _socket, _name, _no_network
"""


@dataclass(frozen=True)
class ProgramResult:
    passed: bool
    status: str  # "passed", "failed" (non-zero exit / exception), or "timeout"
    detail: str  # the tail of stderr, for diagnosis


@functools.lru_cache(maxsize=1)
def _network_namespace_prefix() -> tuple[str, ...]:
    """``("unshare", "-rn")`` when unprivileged network namespaces work here, else nothing."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return ()
    try:
        probe = subprocess.run([unshare, "-rn", "true"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ()
    return (unshare, "-rn") if probe.returncode == 0 else ()


def run_program(source: str, timeout: float = 10.0, memory_bytes: int = 2 << 30) -> ProgramResult:
    """Run ``source`` as a Python program in the sandbox; ``passed`` means it exited with status 0."""
    program = _PREAMBLE.format(memory=memory_bytes) + source
    with tempfile.TemporaryDirectory(prefix="optimum-rom-sandbox-") as workdir:
        path = os.path.join(workdir, "program.py")
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(program)
        command = [*_network_namespace_prefix(), sys.executable, "-I", path]
        process = subprocess.Popen(
            command,
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={"PATH": os.environ.get("PATH", ""), "PYTHONHASHSEED": "0", "HOME": workdir},
            start_new_session=True,  # its own process group, so a timeout kills its children too
            preexec_fn=lambda: _limit_cpu(timeout),
        )
        try:
            _, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            return ProgramResult(False, "timeout", f"killed after {timeout:g} s")
    detail = stderr.decode("utf-8", errors="replace")[-2000:]
    if process.returncode == 0:
        return ProgramResult(True, "passed", detail)
    return ProgramResult(False, "failed", detail)


def _limit_cpu(seconds: float) -> None:
    import resource

    limit = int(seconds) + 1
    resource.setrlimit(resource.RLIMIT_CPU, (limit, limit))
