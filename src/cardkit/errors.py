"""Errors that a user can fix. The CLI prints their message on one line and exits with code 2."""


class CardkitError(Exception):
    """A problem with the user's input: config, files, names or values.

    The message says what was given, what is valid and how to fix it.
    """


class TrainingDiverged(CardkitError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""
