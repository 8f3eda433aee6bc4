"""One exception type for mistakes a user can fix; the CLI prints it as one line."""


class UserError(Exception):
    """Bad input (file, field, flag). The message names what and where; no traceback is shown."""


def read_json_object(path) -> dict:
    """A JSON file holding an object, or a UserError naming the file (not found, bad JSON, not an object)."""
    from .checks import read_json

    value = read_json(path, constants=True)  # as json.loads: Python writes NaN and Infinity
    if not isinstance(value, dict):
        raise UserError(f"{path}: expected a JSON object")
    return value
