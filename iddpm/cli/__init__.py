"""Command-line interface (``iddpm ...``)."""
