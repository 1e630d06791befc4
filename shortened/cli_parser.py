"""How the command line is read: each verb's flags are built by jsonargparse from pydantic models (the config
models, and the option models of :mod:`shortened.cli`), so a flag is the field it sets — one name from YAML to
flag to Python — and its help is the field's docstring, with its type, default or "required".

Spelling: ``--`` and the field name, nested models with dots (``--calibration.n_samples``, ``--lora.zero_stage``);
``-`` and ``_`` are interchangeable in a flag (``--train-tokens`` is ``--train_tokens``). The spellings of the
previous release are accepted for one more, with a one-line note on stderr naming the new one
(:attr:`Verb.deprecated`).

What this adds to jsonargparse (whose ``ArgumentParser`` is argparse's):

* bare boolean flags (``--quiet``; ``--speed false`` also works) and comma-separated lists (``--ppl wikitext2,ptb``;
  a JSON or YAML list too);
* one-line errors that name the flag as it was typed (``argument --calib-samples: must be an integer in [1,
  1000000], got '-3'``), and a field set by ``--config FILE`` by the file and the field;
* the verb's models validated as a whole before the command runs (a model's own checks, e.g. ``--ratio`` and
  ``--blocks`` together, are errors of the command line: exit 2, nothing written);
* ``--config FILE``: a verb's config model as YAML (retrain: TrainConfig); flags override its values.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from jsonargparse import ArgumentParser as _JsonArgumentParser
from jsonargparse import DefaultHelpFormatter
from pydantic import BaseModel, TypeAdapter, ValidationError
from pydantic.fields import FieldInfo

PROG = "shortened"


class UsageError(Exception):
    """Bad command-line input, found before the command runs: ``shortened VERB: error: MESSAGE`` and exit 2."""


@dataclass(frozen=True)
class Part:
    """A pydantic model whose fields are flags of a verb.

    ``attr``: the validated model is ``args.ATTR``; without one its fields are attributes of ``args`` themselves.
    ``positionals``: fields given by position (in this order), not as ``--FIELD``. ``skip``: fields that are no
    flags. ``default_text``: how a default reads in ``--help`` when the value alone would mislead. ``deferred``: not
    validated when parsed (the command merges the given flags with saved settings and validates them itself; the
    flags default to None, "not given"). ``config``: ``--config FILE`` reads this model's fields from YAML.
    ``checked_as``: a config model some of these options override (sweep's ``--name``), whose rules check them."""

    model: type[BaseModel]
    attr: str | None = None
    positionals: tuple[str, ...] = ()
    skip: frozenset[str] = frozenset()
    default_text: dict[str, str] = field(default_factory=dict)
    deferred: bool = False
    config: bool = False
    checked_as: type[BaseModel] | None = None


@dataclass(frozen=True)
class Verb:
    """A verb: its help (its command's docstring), the models its flags come from, and the flags of the previous
    release (``--old-spelling`` → ``--field``)."""

    name: str
    help: str
    parts: tuple[Part, ...]
    deprecated: dict[str, str] = field(default_factory=dict)


class Typed:
    """What the user typed, by destination (``calibration.n_samples``): the spelling and the raw value (None for a
    bare boolean flag), and which fields a ``--config`` file set. Commands use it to name flags in their messages
    as they were typed and to tell a given value from a default."""

    def __init__(self, flags: dict[str, tuple[str, str | None]] | None = None, config: str | None = None,
                 from_config: set[str] | None = None) -> None:
        self.flags = flags or {}
        self.config = config
        self.from_config = from_config or set()

    def given(self, dest: str) -> bool:
        return dest in self.flags

    def flag(self, dest: str) -> str:
        """The flag as typed (``--calib-seq-len``), else its spelling now (``--calibration.seq_len``)."""
        return self.flags[dest][0] if dest in self.flags else f"--{dest}"

    def raw(self, dest: str) -> str | None:
        return self.flags[dest][1] if dest in self.flags else None

    def origin(self, dest: str) -> str:
        """Where a value came from, for an error message: the flag, the config file's field, or the flag to set."""
        if dest in self.flags or dest not in self.from_config:
            return f"argument {self.flag(dest)}"
        return f"--config {self.config}: {dest}"


# -- how a type reads in --help and in errors ------------------------------------------------------------------------

_BOUND = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}


def _bounds(metadata: Sequence[Any]) -> dict[str, float]:
    found: dict[str, float] = {}
    for m in metadata:
        for key in _BOUND:
            value = getattr(m, key, None)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                found[key] = value
        found.update(_bounds(getattr(m, "metadata", None) or []))  # a pydantic FieldInfo inside Annotated
    return found


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _with_bounds(what: str, bounds: dict[str, float]) -> str:
    lo = ("ge", bounds["ge"]) if "ge" in bounds else ("gt", bounds["gt"]) if "gt" in bounds else None
    hi = ("le", bounds["le"]) if "le" in bounds else ("lt", bounds["lt"]) if "lt" in bounds else None
    if lo and hi:
        return (f"{what} in {'[' if lo[0] == 'ge' else '('}{_num(lo[1])}, {_num(hi[1])}"
                f"{']' if hi[0] == 'le' else ')'}")
    return " ".join([what, *(f"{_BOUND[b[0]]} {_num(b[1])}" for b in (lo, hi) if b)])


def _strip(hint: Any) -> Any:
    """The type under Optional and Annotated (``Optional[Annotated[list[int], ...]]`` → ``list[int]``)."""
    while True:
        origin = get_origin(hint)
        if origin is Annotated:
            hint = get_args(hint)[0]
        elif origin in (Union, types.UnionType):
            rest = [a for a in get_args(hint) if a is not type(None)]
            if len(rest) != 1:
                return hint
            hint = rest[0]
        else:
            return hint


def describe(hint: Any) -> str:
    """A type as words: ``an integer >= 1``, ``a number in (0, 1]``, ``one of cpt, lora``, ``a list of texts``."""
    origin = get_origin(hint)
    if origin is Annotated:
        base, *meta = get_args(hint)
        return _with_bounds(describe(base), _bounds(meta))
    if origin in (Union, types.UnionType):
        parts = [describe(a) for a in get_args(hint) if a is not type(None)]
        return " or ".join(dict.fromkeys(parts))
    if origin is Literal:
        values = [str(v) for v in get_args(hint)]
        return values[0] if len(values) == 1 else "one of " + ", ".join(values)
    if origin in (list, tuple, set, frozenset):
        items = [a for a in get_args(hint) if a is not Ellipsis]
        item = describe(items[0]) if items else "value"
        for one, many in (("an integer", "integers"), ("a number", "numbers"), ("text", "texts")):
            if item.startswith(one):
                return f"a list of {many}{item[len(one):]}"
        return f"a list, each {item}"
    if origin is dict or hint is dict:
        return 'a mapping (JSON, e.g. \'{"name": 1}\')'
    return {bool: "true or false", int: "an integer", float: "a number", str: "text"}.get(hint, getattr(
        hint, "__name__", str(hint)))


def plain(doc: str | None) -> str:
    """A docstring as one line of plain text: Sphinx roles and literals unwrapped (``:func:`f``` → ``f``)."""
    doc = re.sub(r":\w+:`~?([^`]+)`", r"\1", doc or "")
    return " ".join(doc.replace("``", "").split())


def _is_bool(action: argparse.Action) -> bool:
    return _strip(getattr(action, "_typehint", None)) is bool


def _is_list(action: argparse.Action) -> bool:
    return get_origin(_strip(getattr(action, "_typehint", None))) in (list, tuple)


def _as_list(action: argparse.Action, text: str) -> str:
    """``a,b`` → ``["a", "b"]`` (items converted to the list's item type where they can be); a JSON or YAML list
    (``[…]``) as it is; ``''`` → ``[]``."""
    if text.lstrip().startswith("["):
        return text
    hint = _strip(action._typehint)
    item = _strip(next(iter(get_args(hint)), str))
    values: list = []
    for text_item in (t.strip() for t in text.split(",")):
        if not text_item:
            continue
        try:
            values.append(int(text_item) if item is int else float(text_item) if item is float else text_item)
        except ValueError:
            values.append(text_item)
    return json.dumps(values)


# -- help -------------------------------------------------------------------------------------------------------------

def _show(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return ",".join(_show(v) for v in value) if value else "[]"
    if isinstance(value, dict):
        return json.dumps(value) if value else "{}"
    return str(value)


class HelpFormatter(DefaultHelpFormatter):
    """Each flag's doc, then what it takes: ``(required; an integer >= 1)``, ``(default: 8; an integer >= 1)``,
    and the spelling it had in the previous release."""

    def _get_help_string(self, action: argparse.Action) -> str:
        hint = getattr(action, "_typehint", None)
        if hint is None or action.help == argparse.SUPPRESS:
            return action.help or ""
        bits = []
        if action.required:
            bits.append("required")
        elif getattr(action, "default_text", None):
            bits.append(f"default: {action.default_text}")
        elif action.default is None and "default" in (action.help or "").lower():
            pass  # the doc says what None means
        else:  # booleans too: "(default: false)" says the flag is off unless given
            bits.append(f"default: {_show(action.default)}")
        if _strip(hint) not in (bool, str):
            bits.append(describe(hint))
        old = getattr(action, "deprecated", ())
        if old:
            bits.append(f"formerly {', '.join(old)}")
        doc = plain(action.help)
        return f"{doc} ({'; '.join(bits)})" if bits else doc

    def start_section(self, heading: str | None) -> None:
        """A group of flags is titled by its model's summary: the first sentence of its docstring."""
        super().start_section(re.split(r"\.\s|:\s", plain(heading))[0].rstrip(".") if heading else heading)


# -- parsers ----------------------------------------------------------------------------------------------------------

class VerbParser(_JsonArgumentParser):
    """One verb's flags (jsonargparse from its models); its errors are raised as :class:`UsageError` for the
    top-level parser to print as one line."""

    def __init__(self, verb: Verb, **kwargs) -> None:
        super().__init__(prog=f"{PROG} {verb.name}", description=plain(verb.help), formatter_class=HelpFormatter,
                         print_config=None, exit_on_error=False, allow_abbrev=False, epilog=EPILOG, **kwargs)
        self.verb = verb
        self.config_dests: set[str] = set()
        for part in verb.parts:
            self._add_part(part)
        self._tidy()
        self.usage = self.compact_usage()

    def compact_usage(self) -> str:
        """``shortened VERB POSITIONAL --required X [options]``: the whole list is in --help."""
        words = [a.metavar or a.dest for a in self._actions if not a.option_strings]
        words += [f"{a.option_strings[0]} {a.metavar or a.dest.split('.')[-1].upper()}" for a in self._actions
                  if a.option_strings and a.required]
        return " ".join([self.prog, *words, "[options]"])

    def _add_part(self, part: Part) -> None:
        fields = part.model.model_fields
        for name in part.positionals:
            self.add_argument(name, help=fields[name].description, metavar=name.upper())
        skip = set(part.skip) | set(part.positionals)
        self.add_class_arguments(part.model, None, as_group=True, skip=skip)
        added = {a.dest for a in self._actions if a.dest.split(".")[0] in set(fields) - skip}
        if part.config:
            self.config_dests.update(added)
        for action in self._actions:
            if action.dest in added:
                if part.deferred:
                    action.default, action.required = None, False
                top = action.dest.split(".")[0]
                if action.dest in part.default_text or top in part.default_text:
                    action.default_text = part.default_text.get(action.dest)

    def _tidy(self) -> None:
        """Drop jsonargparse's ``--MODEL CONFIG`` loaders of nested models (``--data FILE``: ``--config`` reads a
        whole config), show booleans as flags and string choices as choices, and each flag's former spelling."""
        old: dict[str, list[str]] = {}
        for before, now in self.verb.deprecated.items():
            old.setdefault(now, []).append(before)
        for action in list(self._actions):
            action.deprecated = tuple(o for s in action.option_strings for o in old.get(s, ()))
            if type(action).__name__ == "_ActionConfigLoad":
                self._remove_action(action)
                for group in self._action_groups:
                    if action in group._group_actions:
                        group._group_actions.remove(action)
                for string in action.option_strings:
                    self._option_string_actions.pop(string, None)
                self.config_dests.discard(action.dest)
            elif _is_bool(action):
                action.nargs, action.const, action.metavar = "?", True, "true|false"
            else:
                hint = _strip(getattr(action, "_typehint", None))
                if get_origin(hint) is Literal and all(isinstance(v, str) for v in get_args(hint)):
                    action.choices = get_args(hint)

    def error(self, message: str, ex: Exception | None = None):  # noqa: D102 (argparse's, raising)
        raise UsageError(message) from ex

    # -- reading the command line -----------------------------------------------------------------------------------

    def normalize(self, argv: Sequence[str], note: Callable[[str], None]) -> tuple[list[str], Typed]:
        """Flags in the spelling the parser knows (``--train-tokens`` → ``--train_tokens=…``; a deprecated one
        with a note), bare booleans given ``true``, comma lists as JSON; and what was typed, for messages."""
        actions = {s: a for s, a in self._option_string_actions.items() if s.startswith("--")}
        known = {_key(s): s for s in actions}
        old = {_key(before): now for before, now in self.verb.deprecated.items()}
        out: list[str] = []
        typed: dict[str, tuple[str, str | None]] = {}
        i = 0
        while i < len(argv):
            token = argv[i]
            i += 1
            if token == "--":
                out.extend(argv[i - 1:])
                break
            if not token.startswith("--"):
                out.append(token)
                continue
            name, eq, value = token.partition("=")
            if _key(name) in known:
                flag = known[_key(name)]
            elif _key(name) in old:
                flag = old[_key(name)]
                note(f"{name} is deprecated, use {flag} (the old spelling goes in the next release)")
            else:
                out.append(token)  # --help, or unknown: the parser says so
                continue
            action = actions[flag]
            if not eq and _is_bool(action):
                value, eq = (argv[i], "=") if i < len(argv) and argv[i].lower() in ("true", "false") else ("", "")
                i += bool(eq)
            elif not eq:
                if i >= len(argv) or _looks_like_flag(argv[i]):
                    out.append(flag)  # argparse: expected one argument
                    continue
                value, eq = argv[i], "="
                i += 1
            typed[action.dest] = (name, value if eq else None)
            if _is_bool(action):
                out.append(f"{flag}={value or 'true'}")
            else:
                out.append(f"{flag}={_as_list(action, value) if _is_list(action) else value}")
        return out, Typed(typed)

    def load_config(self, path: str, typed: Typed) -> None:
        """``--config FILE``: the config model's fields from YAML become the defaults that flags override."""
        from shortened.errors import ShortenedError
        from shortened.io import read_yaml

        try:
            fields = read_yaml(path)
        except ShortenedError as exc:
            raise UsageError(f"--config {exc}") from exc
        fields = {} if fields is None else fields
        if not isinstance(fields, dict):
            raise UsageError(f"--config {path}: expected a mapping of config fields, got {type(fields).__name__}")
        flat = _flatten(fields, self.config_dests, path)
        typed.config, typed.from_config = path, set(flat)
        self.set_defaults(flat)

    def read(self, argv: Sequence[str], note: Callable[[str], None]) -> argparse.Namespace:
        """Parse and validate one verb's arguments; a :class:`UsageError` names what is wrong."""
        argv, typed = self.normalize(argv, note)
        if "config" in typed.flags and self.config_dests:
            self.load_config(typed.raw("config"), typed)
        try:
            ns = self.parse_args(argv)
        except UsageError as exc:
            raise UsageError(self._explain(str(exc), typed)) from exc
        values = ns.as_dict()
        args = argparse.Namespace(command=self.verb.name, typed=typed)
        for part in self.verb.parts:
            fields = {name: values[name] for name in part.model.model_fields if name in values}
            if part.deferred:
                given = {k: v for k, v in fields.items() if v is not None}
                check_fields(part.model, given, typed)
                setattr(args, part.attr, given)
                continue
            model = validate(part.model, fields, typed)
            if part.checked_as is not None:
                check_fields(part.checked_as, {k: v for k, v in fields.items() if v is not None and typed.given(k)
                                               and k in part.checked_as.model_fields}, typed)
            if part.attr:
                setattr(args, part.attr, model)
            else:
                for name in part.model.model_fields:
                    setattr(args, name, getattr(model, name))
        return args

    def _explain(self, message: str, typed: Typed) -> str:
        """jsonargparse's message as one line naming the flag as typed."""
        key = re.match(r'Parser key "([^"]+)"', message)
        if key:
            dest = key.group(1)
            action = next((a for a in self._actions if a.dest == dest), None)
            problem = f"must be {describe(action._typehint)}" if action is not None else "invalid value"
            if dest in typed.flags:
                return f"{typed.origin(dest)}: {problem}, got {typed.raw(dest)!r}"
            got = re.search(r"Got value: (.*)$", message.strip())
            return f"{typed.origin(dest)}: {problem}" + (f", got {got.group(1)}" if got else "")
        missing = re.match(r"the following arguments are required: (.*)", message)
        if missing:
            names = [n.strip() for n in missing.group(1).split(",")]
            return "the following arguments are required: " + ", ".join(
                n if n.upper() == n or n in self._positional_names() else f"--{n}" for n in names)
        for dest, (spelling, _) in typed.flags.items():
            message = re.sub(rf"(?<![\w.-])--{re.escape(dest)}(?![\w-])", spelling, message)
        return " ".join(message.split())

    def _positional_names(self) -> set[str]:
        return {a.dest for a in self._actions if not a.option_strings}


def _key(flag: str) -> str:
    return "--" + flag[2:].replace("-", "_")


def _looks_like_flag(token: str) -> bool:
    if not token.startswith("-") or token == "-":
        return False
    try:
        float(token)
    except ValueError:
        return True
    return False


def _flatten(fields: dict, dests: set[str], path: str, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for name, value in fields.items():
        key = f"{prefix}{name}"
        if key in dests:
            flat[key] = value
        elif any(d.startswith(f"{key}.") for d in dests):
            if not isinstance(value, dict):
                raise UsageError(f"--config {path}: {key}: expected a mapping of its fields, got {value!r}")
            flat.update(_flatten(value, dests, path, f"{key}."))
        else:
            raise UsageError(f"--config {path}: unknown field {key!r}")
    return flat


# -- validation -------------------------------------------------------------------------------------------------------

def validate(model: type[BaseModel], fields: dict, typed: Typed, prefix: str = "") -> BaseModel:
    """``model.model_validate(fields)``; a bad value is a :class:`UsageError` naming the flag as typed (or the
    ``--config`` file's field), with what was typed."""
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        raise UsageError(explain(exc, model, typed, prefix)) from exc


def _field_type(info: FieldInfo) -> Any:
    return Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation


def _field_error(dest: str, info: FieldInfo, err: dict, typed: Typed) -> str:
    """``argument --flag: must be an integer >= 1, got '0'`` (a field's own check says its own words)."""
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] not in ("value_error", "assertion_error"):
        msg = f"must be {describe(_field_type(info))}"
    raw = typed.raw(dest) if typed.given(dest) else err.get("input")
    shown = raw if isinstance(raw, str) else json.dumps(raw) if isinstance(raw, (dict, list)) else str(raw)
    parsed = str(err.get("input"))
    if typed.given(dest) and not _mentions(msg, shown) and _mentions(msg, parsed):
        msg = re.sub(_word(parsed), shown.replace("\\", "\\\\"), msg, count=1)  # as typed: 2, not 2.0
    if not _mentions(msg, shown):
        msg = re.sub(r", got .*$", "", msg) + f", got {shown!r}"
    return f"{typed.origin(dest)}: {msg}"


def _word(text: str) -> str:
    return rf"(?<![\w.]){re.escape(text)}(?![\w.])"


def _mentions(msg: str, text: str) -> bool:
    return re.search(_word(text), msg) is not None


def check_fields(model: type[BaseModel], fields: dict, typed: Typed) -> None:
    """Each field by the model's rules for it — its type, range and own validators — without the model's checks
    across fields: for settings merged with others before the model is built (select's flags over the
    experiment's saved selection, sweep's --name over its YAML)."""
    validators = model.__pydantic_decorators__.field_validators.values()
    for name, value in fields.items():
        info = model.model_fields[name]
        mine = [v for v in validators if name in v.info.fields and v.info.mode in ("before", "after")]
        try:
            for check in (v for v in mine if v.info.mode == "before"):
                value = check.func(value)
            value = TypeAdapter(_field_type(info)).validate_python(value)
            for check in (v for v in mine if v.info.mode == "after"):
                value = check.func(value)
        except ValidationError as exc:
            raise UsageError(_field_error(name, info, exc.errors()[0], typed)) from exc
        except ValueError as exc:
            raise UsageError(_field_error(name, info, {"type": "value_error", "msg": str(exc), "input": value},
                                          typed)) from exc


def explain(exc: ValidationError, model: type[BaseModel], typed: Typed, prefix: str = "") -> str:
    """A pydantic error of ``model`` as one line: a bad field as :func:`_field_error` says, a check of the model as a
    whole with the fields it names written as flags (``best_under_budget needs --max_params or --max_latency_s``)."""
    err = exc.errors()[0]
    loc = [str(p) for p in err["loc"]]
    msg = err["msg"].removeprefix("Value error, ")
    # the model whose field failed (or whose own check did: loc names the nested model, or nothing)
    owner, fields_at = model, []
    for part in loc:
        sub = _strip(owner.model_fields[part].annotation) if part in owner.model_fields else None
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            owner, fields_at = sub, [*fields_at, part]
        else:
            break
    if len(loc) > len(fields_at) and loc[len(fields_at)] in owner.model_fields:
        dest = prefix + ".".join(loc[:len(fields_at) + 1])
        return _field_error(dest, owner.model_fields[loc[len(fields_at)]], err, typed)
    # a check of the model as a whole: its fields named as flags
    base = prefix + "".join(f"{p}." for p in fields_at)
    from_file = False

    def name(field_name: str) -> str:  # a field set in the --config file keeps its YAML name
        nonlocal from_file
        dest = base + field_name
        if not typed.given(dest) and dest in typed.from_config:
            from_file = True
            return dest
        return typed.flag(dest)

    for field_name in sorted(owner.model_fields, key=len, reverse=True):
        if "_" in field_name:
            msg = re.sub(rf"(?<![\w.-]){re.escape(field_name)}(?![\w-])", lambda _: name(field_name), msg)
    first = re.match(r"(\w+)\b", msg)
    if first and first.group(1) in owner.model_fields and "_" not in first.group(1):
        msg = name(first.group(1)) + msg[first.end():]
    return f"--config {typed.config}: {msg}" if from_file else msg


EPILOG = ("Flags are the config fields: --FIELD, nested ones with dots (--calibration.n_samples); '-' and '_' are "
          "interchangeable (--train-tokens). Lists: comma-separated (a,b) or JSON; mappings: JSON; booleans: "
          "--FLAG or --FLAG false.")


# -- the top level ----------------------------------------------------------------------------------------------------

def version() -> str:
    """The installed distribution's version (pyproject.toml's), via its package metadata."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version(PROG)
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


class Parser(_JsonArgumentParser):
    """``shortened [-v] VERB …``: finds the verb, lets its :class:`VerbParser` read the rest, and turns a
    :class:`UsageError` into one line on stderr and exit 2."""

    def __init__(self, verbs: Sequence[Verb], description: str) -> None:
        super().__init__(prog=PROG, description=description, formatter_class=HelpFormatter, print_config=None,
                         exit_on_error=False, allow_abbrev=False)
        self.add_argument("-v", "--verbose", action="store_true",
                          help="log progress (INFO), and let Ray workers show their libraries' progress bars and "
                               "warnings (silenced by default)")
        self.add_argument("-V", "--version", action="store_true", help="print the version and exit")
        self.verbs = {v.name: VerbParser(v) for v in verbs}
        sub = self.add_subcommands(dest="command", required=True)
        for verb in verbs:
            sub.add_subcommand(verb.name, self.verbs[verb.name], help=plain(verb.help))
            self.verbs[verb.name].prog = f"{PROG} {verb.name}"

    def parse_args(self, args: Sequence[str] | None = None, namespace=None, **kwargs) -> argparse.Namespace:
        argv = list(sys.argv[1:] if args is None else args)
        verbose = False
        while argv and argv[0].startswith("-"):
            flag = argv.pop(0)
            if flag in ("-h", "--help"):
                self.print_help()
                self.exit(0)
            if flag in ("-V", "--version"):
                print(f"{PROG} {version()}")
                self.exit(0)
            if flag not in ("-v", "--verbose"):
                self._fail(PROG, f"unrecognized arguments: {flag}")
            verbose = True
        if not argv:
            self._fail(PROG, "the following arguments are required: command")
        name, rest = argv[0], argv[1:]
        if name not in self.verbs:
            self._fail(PROG, f"argument command: invalid choice: {name!r} (choose from {', '.join(self.verbs)})")
        prog = f"{PROG} {name}"
        try:
            parsed = self.verbs[name].read(rest, lambda text: print(f"{prog}: note: {text}", file=sys.stderr))
        except UsageError as exc:
            self._fail(prog, str(exc))
        parsed.verbose = verbose
        return parsed

    def _fail(self, prog: str, message: str):
        self.exit(2, f"{prog}: error: {message} (see {prog} --help)\n")


__all__ = ["Parser", "Part", "Typed", "UsageError", "Verb", "VerbParser", "describe", "explain", "validate"]
