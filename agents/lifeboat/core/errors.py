"""Error hierarchy: each class carries a message template and a stable exit code."""

from __future__ import annotations


class LifeboatError(Exception):
    """Generic Lifeboat error: {}."""

    exit_code = 2

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        self.args = args

    def __str__(self) -> str:
        template = (type(self).__doc__ or "{}").strip().splitlines()[0]
        try:
            return template.format(*self.args)
        except (IndexError, KeyError):
            return " ".join(str(a) for a in self.args)


class ConfigError(LifeboatError):
    """Error in configuration at '{}': {}."""

    exit_code = 78  # EX_CONFIG

    def __init__(self, path: str, message: str) -> None:
        super().__init__(path, message)
        self.path = path


class FormatError(LifeboatError):
    """Malformed {}: {}."""

    exit_code = 65  # EX_DATAERR


class FrameError(FormatError):
    """Bad frame {} in batch: {}."""


class IntegrityError(LifeboatError):
    """Repository object '{}' failed authentication: {}. Run 'lifeboat verify' to list every damaged object."""

    exit_code = 66

    def __init__(self, name: str, message: str) -> None:
        super().__init__(name, message)
        self.object_name = name


class KeyUnlockError(LifeboatError):
    """Cannot unlock the repository: {}."""

    exit_code = 77


class RepositoryError(LifeboatError):
    """Repository error: {}."""

    exit_code = 74


class ObjectNotFound(RepositoryError):
    """Repository object '{}' does not exist{}."""

    def __init__(self, name: str, hint: str = "") -> None:
        super().__init__(name, hint)
        self.object_name = name


class TransientBackendError(RepositoryError):
    """Transient backend error (will be retried): {}."""


class PointNotFound(LifeboatError):
    """No recovery point matches '{}'. Run 'lifeboat points' to list the retained points."""

    exit_code = 3


class PointIncomplete(LifeboatError):
    """Recovery point '{}' cannot be materialised: {}."""

    exit_code = 66
