"""The one exception type a stage raises for bad input: the CLI prints its message as one line."""


class BertpipeError(Exception):
    """Bad input or state a user can fix; `exit_code` is what the CLI exits with."""

    exit_code = 1


class ConfigError(BertpipeError):
    """An unknown key, a wrong type or a bad value in a config or an override."""

    exit_code = 2
