"""The one base class of user errors: bad config, path, mask, budget, model or text.

The CLI turns a :class:`UserError` into one message and exit code 2; anything else is a bug and keeps its
traceback. It subclasses ``ValueError`` so callers that catch bad values keep working.
"""


class UserError(ValueError):
    """Input the user can fix; the message names the file, key or flag and the value."""
