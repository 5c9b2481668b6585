"""User-facing errors: one clear line, no traceback (the CLI and server print `str(err)`)."""


class QianwenError(Exception):
    """An error the user caused or can fix (bad path, corrupt file, bad request)."""


class ModelLoadError(QianwenError):
    """A checkpoint could not be read: missing, truncated, corrupt or of an unknown architecture."""
