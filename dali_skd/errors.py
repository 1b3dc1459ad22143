"""The project's own errors: a problem with the user's input, files, settings or machine that the user can act on.
The command line prints one of these as one line (what was wrong, where, and what to do) and exits 1; any other
exception is a bug, reported as one and with its traceback kept."""


class DaliSkdError(Exception):
    """An error a user can act on; its message names the file, shard or setting and what to do next."""
