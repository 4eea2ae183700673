"""DSpark Lab: make an existing PyTorch training job faster and smaller, and steer it live.

The facade a user or plugin author imports::

    from dspark_lab import hookimpl          # write a plugin
    import dspark_lab as dl
    job = dl.attach(model, optimizer)        # opt a script into the live runtime
"""

from __future__ import annotations

import pluggy

__version__ = "0.1.0"

PROJECT_NAME = "dspark_lab"  # the pluggy project name and the entry-point group

hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


def attach(*args, **kwargs):
    """Attach the live runtime to a model and optimizer; see :func:`dspark_lab.runtime.attach.attach`."""
    from dspark_lab.runtime.attach import attach as _attach

    return _attach(*args, **kwargs)


def load_ipython_extension(ipython):
    """``%load_ext dspark_lab`` registers the ``%dspark`` magics."""
    from dspark_lab.jupyter.magics import load_ipython_extension as _load

    _load(ipython)


__all__ = ["__version__", "attach", "hookimpl", "PROJECT_NAME"]
