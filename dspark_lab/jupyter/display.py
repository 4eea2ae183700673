"""Where the output goes: a notebook (HTML, widgets, BokehJS loaded inline) or a terminal IPython (text).

jupyter_bokeh's widget does not load BokehJS itself; without a load a figure stays blank in a real browser while a
headless run still passes. :func:`ensure_bokehjs` publishes BokehJS inline once per kernel, as
``bokeh.io.output_notebook(INLINE)`` does: no CDN is reachable on these machines or behind many firewalls.
"""

from __future__ import annotations

from typing import Any

_bokehjs_loaded = False


def shell() -> Any:
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover - IPython comes with ipykernel
        return None
    return get_ipython()


def in_notebook(ip: Any = None) -> bool:
    """True inside a Jupyter kernel (a front end that renders HTML and widgets), False in a terminal or script."""
    ip = ip if ip is not None else shell()
    return ip is not None and getattr(ip, "kernel", None) is not None


def ensure_bokehjs(force: bool = False) -> bool:
    """Publish BokehJS (inline) into the current output once per kernel; returns True when it published now."""
    global _bokehjs_loaded
    if (_bokehjs_loaded and not force) or not in_notebook():
        return False
    from bokeh.io import output_notebook
    from bokeh.resources import INLINE

    output_notebook(resources=INLINE, hide_banner=True)
    _bokehjs_loaded = True
    return True


def show(obj: Any) -> None:
    """Display ``obj`` in a notebook, or print its text form in a terminal IPython or a script."""
    if in_notebook():
        from IPython.display import display

        display(obj)
    else:
        print(obj.to_text() if hasattr(obj, "to_text") else obj)


def close_tree(children) -> None:
    """Close widgets and, depth first, the widgets they contain (a closed box leaves its children open)."""
    for child in children:
        close_tree(getattr(child, "children", ()))
        child.close()
