"""The one class of error a user can fix by changing their input."""


class UserError(Exception):
    """Bad input (a flag, a file, a checkpoint): the CLI prints it as one line, without a traceback."""
