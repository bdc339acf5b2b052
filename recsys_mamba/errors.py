"""The one exception type for mistakes a user can fix (bad input, bad config, missing files).

Entry points catch it and print its message without a traceback; the message must say what is
wrong, where (file, column, row) and how to fix it.
"""


class RecsysError(ValueError):
    """A user-fixable problem; `str(err)` is shown to the user as is."""
