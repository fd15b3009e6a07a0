"""The harness of the tests that show a killed writer loses nothing: run a script in a child process that SIGKILLs
itself right after its Nth counted step (a rename, an exchange, a file copied), for N = 1, 2, ... until it completes.

The script wraps what it wants counted with ``counted`` (defined before it runs) and reads its own arguments from
``ARGS``."""

import signal
import subprocess
import sys
import textwrap

PRELUDE = textwrap.dedent("""
    import os, signal, sys
    KILL_AFTER, ARGS, STEPS = int(sys.argv[1]), sys.argv[2:], [0]

    def counted(function):
        def step(*args, **kwargs):
            result = function(*args, **kwargs)
            STEPS[0] += 1
            if STEPS[0] == KILL_AFTER:
                os.kill(os.getpid(), signal.SIGKILL)
            return result
        return step
""")


def run_killed_after(script: str, kill_after: int, *args) -> bool:
    """Run ``script`` to be killed after step ``kill_after``; True when it completed before that step came."""
    result = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(script), str(kill_after),
                             *map(str, args)], capture_output=True, text=True, timeout=120)
    assert result.returncode in (0, -signal.SIGKILL), result.stderr
    return result.returncode == 0
