"""One module per CLI verb; each module's `run` is that verb's spine (cli.py calls it, nothing below imports it)."""
