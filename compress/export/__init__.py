"""Exporters: re-encode a finished stage's checkpoint in the formats serving runtimes read."""
