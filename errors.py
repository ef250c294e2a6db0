"""The one base class of the errors a user can fix: main.py prints their message as one line
(`error: ...`) and exits with status 1, instead of a traceback. Each module defines its own
subclass (ConfigError, DatasetError, CheckpointError, ScoreError, WriteError, ...); imports
nothing, so every module may import it."""


class UserError(Exception):
    """Something about the flags, files, data or machine that the message explains."""
