"""The one error a bad configuration raises."""

from __future__ import annotations


class ConfigError(Exception):
    """A setting is missing, malformed or contradictory; ``str()`` is one line naming the key."""

    def __init__(self, key: str, message: str) -> None:
        # One line, always: the CLI prints it as is and exits 2.
        self.key = " ".join(str(key).splitlines())
        self.message = " ".join(message.splitlines())
        super().__init__(self.key, self.message)

    def __str__(self) -> str:
        return f"config: {self.key}: {self.message}"
