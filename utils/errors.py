"""The error every script reports as one line with exit code 2 (see utils.cli.run_main)."""


class UsageError(Exception):
    """A bad flag value or an unusable file: the message names the problem and the fix."""
