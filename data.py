"""Data for LVDM (owner: data.py). Placeholder being filled in: see DESIGN.md."""


class UserError(Exception):
    """A mistake the user can fix (bad path, wrong size, missing weights).

    Raised with one sentence that names the fix; the command-line entry points
    print it and exit with status 2 instead of showing a traceback.
    """
