"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class MedusaError(Exception):
    """A user-facing error: bad input, a missing package, a mismatched checkpoint.

    The message is complete on one line; the CLI prints it as ``error: <message>`` and exits with 2.
    """
