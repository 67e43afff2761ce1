"""The errors an entry point shows as one line: bad input a user can fix, and a rank lost by a job."""


class UserError(Exception):
    """Bad input (a flag, a file, a checkpoint): the CLI prints it as one line, without a traceback."""


class RankLost(RuntimeError):
    """A collective failed: another rank died or stopped answering. The other rank's failure is the news; this
    one is its consequence (the launcher reports the first real cause)."""
