"""What torchrun runs in every rank under ``dspark-lab run``: start the Job, then the user's script, unchanged.

``python -m torch.distributed.run ... -m dspark_lab.runtime.bootstrap script.py args...``, or ``... -m
dspark_lab.runtime.bootstrap -m MODULE args...`` for ``dspark-lab run -m MODULE``: the module runs as ``python -m``
runs it (``runpy.run_module(MODULE, run_name="__main__", alter_sys=True)``: ``sys.argv[0]`` is its file).
"""

from __future__ import annotations

import _thread
import json
import os
import runpy
import signal
import sys
import threading
import time
import traceback

from dspark_lab.runtime.attach import Job, start_job
from dspark_lab.runtime.coordinator import StopRun
from dspark_lab.runtime.launch import INTERRUPTED_EXIT
from dspark_lab.runtime.launchers.agent_events import after_peer
from dspark_lab.runtime.program import MODULE_FLAG
from dspark_lab.runtime.records import LAUNCH_POLICIES_VARIABLE, RUN_DIR_VARIABLE, RunDir


def main(argv: list[str]) -> int:
    module = argv[:1] == [MODULE_FLAG]
    if not argv or (module and len(argv) < 2):
        print("usage: python -m dspark_lab.runtime.bootstrap (script.py | -m module) [args...]", file=sys.stderr)
        return 2
    run_dir = RunDir(os.environ[RUN_DIR_VARIABLE])
    job = start_job(run_dir, launch_policies=json.loads(os.environ.get(LAUNCH_POLICIES_VARIABLE, "{}")))
    if module:  # as python -m: the current directory first on sys.path, argv[0] the module's file (run_module's)
        name, script_args = argv[1], argv[2:]
        sys.argv = [name, *script_args]
        if os.getcwd() not in sys.path[:1]:
            sys.path.insert(0, os.getcwd())
        run = lambda: runpy.run_module(name, run_name="__main__", alter_sys=True)
    else:
        script, script_args = os.path.abspath(argv[0]), argv[1:]
        sys.argv = [script, *script_args]
        sys.path.insert(0, os.path.dirname(script))
        run = lambda: runpy.run_path(script, run_name="__main__")
    code = 0
    ctrl_c = CtrlC()
    try:
        run()
    except StopRun:
        pass
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if code:
            job.record_event("error", step=job.step, rank=job.rank, reason=f"script exited with {exc.code}",
                             exit_code=code)  # the supervisor reports the first rank's (runtime/launch.py)
    except BaseException as exc:
        # Ctrl-C reached the whole process group: a stop, as `dspark-lab stop` records one; also when the Ctrl-C
        # ended a peer first and this rank failed on the connection it closed
        if isinstance(exc, KeyboardInterrupt) or ctrl_c.pressed:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # torchrun passes the same Ctrl-C on: one is enough
            job.record_event("stop", step=job.step, rank=job.rank, reason="interrupted (SIGINT, Ctrl-C)")
            return INTERRUPTED_EXIT
        job.record_event("error", step=job.step, rank=job.rank, exit_code=1,
                         reason=after_peer(run_dir.events(), job.rank, f"{type(exc).__name__}: {exc}"))
        traceback.print_exc()
        code = 1
    finally:
        ctrl_c.restore()
        job.close()
        Job.current = None
    return code


class CtrlC:
    """SIGINT in a rank, made to end the script however it lands.

    Python raises the KeyboardInterrupt wherever the main thread is, and when that is a finalizer (a ``__del__``, a
    weakref callback: the runtime's saved-tensor counter has one) it only prints "Exception ignored" and the script
    goes on, to fail moments later on the connection a peer closed when its own Ctrl-C ended it. So: remember that
    Ctrl-C was pressed, and raise a swallowed one again once the finalizer is over (a thread asks for it once the
    unraisable hook has returned: raised in the hook, it would be swallowed again), saying nothing about it.
    """

    def __init__(self):
        self.pressed = False
        self.in_hook = False
        self.previous_hook = sys.unraisablehook
        sys.unraisablehook = self.unraisable
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where SIGINT is ignored
            signal.signal(signal.SIGINT, self.interrupt)

    def interrupt(self, signum, frame):
        self.pressed = True
        if self.in_hook:  # a second Ctrl-C while one is being raised again: that one is enough
            return
        raise KeyboardInterrupt

    def unraisable(self, unraisable) -> None:
        if self.pressed and issubclass(unraisable.exc_type, KeyboardInterrupt):
            self.in_hook = True
            try:
                threading.Thread(target=self.raise_after_hook, name="dspark-ctrl-c", daemon=True).start()
            finally:
                self.in_hook = False
            return
        self.previous_hook(unraisable)

    def raise_after_hook(self) -> None:
        while self.in_hook:
            time.sleep(0.001)
        _thread.interrupt_main()  # the main thread runs :meth:`interrupt` at its next line

    def restore(self) -> None:
        sys.unraisablehook = self.previous_hook
        if signal.getsignal(signal.SIGINT) == self.interrupt:
            signal.signal(signal.SIGINT, signal.default_int_handler)


def exit_now(code: int) -> None:
    """Run atexit handlers and flush, then leave without C++ static destructors.

    Under load, torch's gloo/TCPStore threads can still be joinable when the interpreter tears down, and the
    process then dies with "terminate called without an active exception" (SIGABRT) after the script finished
    cleanly; torchrun would report the run as failed. The script's own atexit handlers still run.
    """
    import atexit

    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main(sys.argv[1:]))
