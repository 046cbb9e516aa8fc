"""Errors that the command line reports as one clear line."""


class VlkitError(Exception):
    """A problem caused by the user's input or environment, reported without a traceback.

    The message must name what is wrong (file, row, key) and, where possible, what to do.
    """


class DataError(VlkitError):
    """Bad or missing input data."""
