"""The errors a user can cause. The command line prints their message, without a traceback."""


class UserError(Exception):
    """Bad input: the message names the key, file or flag and says what is allowed."""
