"""Reading run directories back: comparison tables, PNG plots and the self-contained HTML report."""
