"""Errors named for the situation. Each message is one line a person can act on."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its repr when the message is empty)."""
    return (str(exc).strip() or repr(exc)).splitlines()[0]


class SettingsError(ValueError):
    """An environment variable has a value the worker cannot use."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable}: {problem}")
        self.variable = variable


class ModelLoadError(RuntimeError):
    """A model could not be loaded completely; the worker must not serve it."""

    def __init__(self, model: str, problem: str) -> None:
        super().__init__(f"cannot load model {model!r}: {problem}")
        self.model = model
