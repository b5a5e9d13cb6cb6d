"""Errors a user can act on. The command line prints their message, not a traceback."""


class MmsslError(Exception):
    """Base class: the message names the file, record or key at fault."""


class ConfigError(MmsslError, ValueError):
    """A recipe, override or builder option that cannot be used."""


class DataError(MmsslError):
    """A media file or manifest record that cannot be used."""
