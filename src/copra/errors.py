"""One exception type for mistakes a user can fix (bad config, missing file, wrong name).

The CLI prints a UserError as a single line and exits with code 2; anything else is a bug and keeps
its traceback.
"""


class UserError(ValueError):
    """A problem with the user's input: the message names the offending value, key or file."""
