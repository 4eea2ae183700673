"""What torchrun runs in every rank under ``dspark-lab run``: start the Job, then the user's script, unchanged.

``python -m torch.distributed.run ... -m dspark_lab.runtime.bootstrap script.py args...``
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import traceback

from dspark_lab.runtime.attach import Job, start_job
from dspark_lab.runtime.coordinator import StopRun
from dspark_lab.runtime.records import RunDir


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m dspark_lab.runtime.bootstrap script.py [args...]", file=sys.stderr)
        return 2
    script, script_args = os.path.abspath(argv[0]), argv[1:]
    run_dir = RunDir(os.environ["DSPARK_RUN_DIR"])
    job = start_job(run_dir, launch_policies=json.loads(os.environ.get("DSPARK_LAUNCH_POLICIES", "{}")))
    sys.argv = [script, *script_args]
    sys.path.insert(0, os.path.dirname(script))
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except StopRun:
        pass
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if code:
            job.record_event("error", step=job.step, rank=job.rank, reason=f"script exited with {exc.code}")
    except BaseException as exc:
        job.record_event("error", step=job.step, rank=job.rank, reason=f"{type(exc).__name__}: {exc}")
        traceback.print_exc()
        code = 1
    finally:
        job.close()
        Job.current = None
    return code


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
