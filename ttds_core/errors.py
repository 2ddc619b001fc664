"""One exception type for every mistake a user can make.

The CLI and the stage scripts catch `TTDSError` and print its message as a single
line (no traceback): the message must name the file, field or parameter at fault
and say what was expected.
"""


class TTDSError(Exception):
    """A user-facing error: bad input, bad parameter, missing artifact."""
