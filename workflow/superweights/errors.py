"""Errors a user can fix: reported as one line, exit status 2."""


class UserError(Exception):
    """A problem with the user's input or configuration, explained in one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
