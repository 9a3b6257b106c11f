"""The errors a user can fix: every one says what was wrong and how to fix it, and the entry points turn them
into exit codes (2 for a bad argument, 1 for other bad input) instead of tracebacks."""


class UserError(ValueError):
    """Bad input from the user (arguments, data, model, config): the message says what and how to fix it."""


class ArgumentError(UserError):
    """Bad user input: the message names the argument, what was expected and the fix."""
