"""How to start pytest in a child process so that SIGINT (Ctrl-C, a supervisor's timeout) raises
KeyboardInterrupt there and pytest tears its session down: Python ignores SIGINT for good when it starts with
SIGINT ignored (a `&` job of a shell without job control), so the child installs Python's default handler
explicitly before it runs pytest. Used by the multi-GPU validation script and the Ctrl-C teardown test."""
from __future__ import annotations

INTERRUPTIBLE_PYTEST = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
                        "sys.argv[0] = 'pytest'; runpy.run_module('pytest', run_name='__main__', alter_sys=True)")
