"""One exception type for mistakes a user can fix; the CLI prints it as one line."""


class UserError(Exception):
    """Bad input (file, field, flag). The message names what and where; no traceback is shown."""
