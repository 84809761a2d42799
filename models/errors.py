"""The one base of every mistake a user can fix: the scripts report it as one line, exit code 2.

It lives with the models because models/ may import nothing of utils/, and checkpoint and config
errors begin here; every other error type of the project derives from it too.
"""


class UserError(Exception):
    """A mistake the user can fix; the message names the problem and the fix."""


class UsageError(UserError):
    """A bad flag value, an unusable file, or a run that cannot go on as asked."""


def one_line(error: BaseException, limit: int = 160) -> str:
    """An exception's text on one line and shortened, for messages that quote it: some
    (torch.load's, pickle's) run to pages."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
