"""The Jupyter layer: ``%dspark`` magics, the run dashboard, the policy panel and the device view.

This is the only package that imports ipywidgets (and jupyter_bokeh); the figures come from
:mod:`dspark_lab.views` and the verbs from :mod:`dspark_lab.commands`, shared with the CLI.
"""
