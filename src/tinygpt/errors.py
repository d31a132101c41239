"""The one exception type that reaches the user.

Anything the user can fix (a missing file, a bad flag value, a prompt with unknown characters)
raises `UserError`. The CLI prints its message on one line and exits with status 2; no
traceback, because the traceback would only hide the sentence that matters. Subclasses set
another `exit_code`: a diverged run (3, `train.DivergedError`), and the machine running out of
memory or disk (4, `resources.ResourceError`).
"""


class UserError(Exception):
    """A problem with the user's input, with a message that names the problem and the fix."""

    exit_code = 2
