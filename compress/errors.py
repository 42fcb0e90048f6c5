"""The one exception type for bad user input and predictable failures.

A `CompressError` is shown by the CLI as a single line (`error: ...`) with exit code 2 and no
traceback. Raise it for anything the user can fix: bad YAML, unknown stage or key, missing model,
missing optional package, a corrupt checkpoint, a stage predicted not to fit in memory.
Bugs stay ordinary exceptions so their tracebacks are seen.
"""


class CompressError(Exception):
    """A user-facing error: one line, names the problem and, where possible, the fix."""
