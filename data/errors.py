"""Exceptions that end a run on purpose, each turned into one line and an exit status by the scripts.

They live in data/, the bottom of the import graph (models/ and data/ import nothing of the repository
above them), because the data loaders raise UserError too."""


class UserError(Exception):
    """A mistake the user can fix (flags, files, data): one line on stderr, exit status 2."""


class Interrupted(Exception):
    """SIGTERM or SIGINT arrived; the run saved its state and stops."""


class Diverged(Exception):
    """A loss became NaN or infinite; the run stops without saving."""
