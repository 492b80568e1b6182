"""`chattune ui`: the whole loop in a browser page (Gradio), driving the same verbs and layers as the CLI.

The top of the layering beside cli.py: it starts `chattune train/eval/merge` as processes, and calls the
functions the verbs are made of (data check, the run's renderer, streaming, the run readers) for what a
page shows live. The pieces without Gradio (paths, form, jobs, live, views, strings) are plain modules
tested on their own; app.py and tabs_*.py lay out the page.
"""
