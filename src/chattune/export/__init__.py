"""Exporting a trained run: its adapter merged into the base model (merge.py)."""
