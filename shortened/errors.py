"""The one exception type users see for bad input: its message names the file, field or value at fault."""


class ShortenedError(ValueError):
    """Bad input or an unsupported model, raised before anything is written."""


def validated(cls, fields: dict, what: str):
    """``cls.model_validate(fields)``, or a ShortenedError naming the first bad field; ``what`` says whose fields."""
    from pydantic import ValidationError

    try:
        return cls.model_validate(fields)
    except ValidationError as exc:
        raise ShortenedError(validation_message(exc, what)) from exc


def validation_message(exc, what: str) -> str:
    """``bad WHAT FIELD: PROBLEM (got VALUE)`` for the first error of a pydantic ValidationError."""
    err = exc.errors()[0]
    loc = ".".join(map(str, err["loc"])) or "(top level)"
    value = f" (got {err['input']!r})" if err.get("type") != "missing" and not isinstance(err.get("input"), dict) \
        else ""
    return f"bad {what} {loc}: {err['msg']}{value}"


class Interrupted(ShortenedError):
    """Work stopped before it finished (Ctrl-C, a stop signal); the message says how to resume. Exit code 130."""
