"""The error of the data sets, whatever their source (CIFAR, an image folder, the device copy)."""

from models.errors import UserError


class DataError(UserError):
    """The data set is missing or malformed; the message is one line a user can act on."""
