"""What torchrun runs in every rank under ``dspark-lab run``: start the Job, then the user's script, unchanged.

``python -m torch.distributed.run ... -m dspark_lab.runtime.bootstrap script.py args...``
"""

from __future__ import annotations

import json
import os
import runpy
import sys

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
    try:
        runpy.run_path(script, run_name="__main__")
    except StopRun:
        pass
    except SystemExit as exc:
        if exc.code not in (0, None):
            job.record_event("error", step=job.step, rank=job.rank, reason=f"script exited with {exc.code}")
        raise
    except BaseException as exc:
        job.record_event("error", step=job.step, rank=job.rank, reason=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        job.close()
        Job.current = None
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
