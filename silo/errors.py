"""The one base class for errors a user can fix; the CLI prints them as one line."""


class SiloError(Exception):
    """Bad input or state the user can fix; the message says what and where."""


USER_ERRORS: tuple[type[BaseException], ...] = (SiloError, FileNotFoundError, FileExistsError)
