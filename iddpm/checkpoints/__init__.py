"""Checkpoint I/O: atomic writes, iddpm's safetensors+JSON format, import of the original's .pt."""
