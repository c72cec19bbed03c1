"""Errors reported to users as one line (file, line, field, what is wrong), never a deep traceback."""


class LMForgeError(Exception):
    """A user-facing error; the CLI prints ``lmforge CMD: error: <message>`` and exits 1."""
