"""Command-line options generated from the config schema, and the argparse pieces that present them.

Every leaf field of :class:`pipeline.config.PipelineConfig` is an option ``--section.field VALUE``
(values are YAML scalars, validated by the schema). This module walks the schema
(:func:`schema_sections`), registers the options grouped by section with one line of help each
(:func:`add_schema_options`), hides whole sections from ``--help`` while still accepting them
(``--help-all`` shows them), and reports an unknown option with the closest real one
(:class:`OptionParser`).
"""

from __future__ import annotations

import argparse
import difflib
import inspect
import json
import re
import textwrap
import types
import typing
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from typing import Any

import yaml
from pydantic import BaseModel

from pipeline.config import PipelineConfig

__all__ = [
    "HELP_ALL",
    "OneLineHelpFormatter",
    "OptionParser",
    "SchemaOption",
    "SchemaSection",
    "add_schema_options",
    "parse_value",
    "schema_options",
    "schema_overrides",
    "schema_sections",
]

HELP_ALL = "--help-all"
OVERRIDE_PREFIX = "override:"  # argparse dest of a schema option: "override:train.optimizer.lr"
_ALL_SECTIONS = "*"
_MAX_SUGGESTIONS = 4
_MAX_LISTED = 12  # a section with more options than this is not listed in an unknown-option error


@dataclass(frozen=True)
class SchemaOption:
    """One leaf field of the schema as a command-line option."""

    dotted: str  # "train.optimizer.lr"
    metavar: str  # "FLOAT", "INT|null", "adam|radam"
    default: str | None  # as YAML would write it ("0.002", "null"); None when the field is required
    description: str

    @property
    def flag(self) -> str:
        return f"--{self.dotted}"

    @property
    def help(self) -> str:
        """The option's one-line help: its description, then its default."""
        tail = "[required]" if self.default is None else f"[default {self.default}]"
        return f"{self.description} {tail}".strip()


@dataclass(frozen=True)
class SchemaSection:
    """The leaf fields of one section (``""`` for the top level, ``"train.optimizer"``, ...)."""

    name: str
    description: str
    options: list[SchemaOption] = field(default_factory=list)

    @property
    def top(self) -> str:
        """The top-level section it belongs to (``"train"`` for ``"train.optimizer"``)."""
        return self.name.split(".", 1)[0]


def parse_value(text: str) -> Any:
    """A command-line value as a YAML scalar (``0.5``, ``null``, ``[1, 2]``); text that is not YAML as is."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def schema_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The ``--section.field VALUE`` options given (see :func:`add_schema_options`): ``{dotted: value}``."""
    return {key[len(OVERRIDE_PREFIX):]: parse_value(value) for key, value in vars(args).items()
            if key.startswith(OVERRIDE_PREFIX) and value is not None}


def _is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _section_class(annotation: Any) -> type[BaseModel] | None:
    """The section model of a field: ``Section`` or ``Section | None`` (an optional section, e.g. ``vae``:
    its options still exist, and setting one creates the section)."""
    if _is_section(annotation):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(members) == 1 and _is_section(members[0]):
            return members[0]
    return None


def _plain(text: str) -> str:
    """Docstring text without reStructuredText markup (``:class:`X``` -> X, ````x```` -> x)."""
    text = re.sub(r":\w+:`~?([^`]+)`", r"\1", text)
    return " ".join(text.replace("``", "").split())


def _doc_line(model: type[BaseModel]) -> str:
    doc = inspect.getdoc(model) or ""
    return _plain(doc.split("\n\n", 1)[0])


def _metavar(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return "|".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        parts = [_metavar(a) for a in args if a is not type(None)]
        return "|".join(parts + (["null"] if type(None) in args else []))
    if annotation is bool:
        return "BOOL"
    if annotation is int:
        return "INT"
    if annotation is float:
        return "FLOAT"
    if annotation is str:
        return "TEXT"
    if annotation is dict or origin is dict:
        return "MAP"
    if annotation is list or origin is list:
        return "LIST"
    return getattr(annotation, "__name__", str(annotation)).upper()


def _yaml_text(value: Any) -> str:
    """A default as it would be typed on the command line (a YAML scalar)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value or "''"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return repr(value)


def schema_sections(model: type[BaseModel] = PipelineConfig) -> list[SchemaSection]:
    """Every section of the schema with its leaf fields, in field order (a section before its subsections).

    Defaults are read from the default instance of each section, so that a section whose factory sets
    its own values (``cluster.train.gpus`` 1, ``cluster.driver.cpu`` 250m) shows those.
    """
    sections: list[SchemaSection] = []

    def walk(cls: type[BaseModel], name: str, description: str, defaults: BaseModel | None) -> None:
        section = SchemaSection(name, description)
        sections.append(section)
        prefix = f"{name}." if name else ""
        for field_name, info in cls.model_fields.items():
            annotation = info.annotation
            if info.is_required():
                default: Any = ...
            elif defaults is not None:
                default = getattr(defaults, field_name)
            else:
                default = info.get_default(call_default_factory=True)
            section_class = _section_class(annotation)
            if section_class is not None:
                doc = _doc_line(section_class)
                # "The driver pod." + the class's line: which pod, then what the section holds.
                text = f"{info.description.rstrip('.')}: {doc}" if info.description else doc
                walk(section_class, f"{prefix}{field_name}", text, None if default in (..., None) else default)
                continue
            section.options.append(SchemaOption(
                dotted=f"{prefix}{field_name}",
                metavar=_metavar(annotation),
                default=None if default is ... else _yaml_text(default),
                description=" ".join((info.description or "").split()),
            ))

    walk(model, "", _doc_line(model), None)
    return [s for s in sections if s.options]


def schema_options(model: type[BaseModel] = PipelineConfig, prefix: str = "") -> Iterator[tuple[str, str]]:
    """(dotted field name, help text) for every leaf field of the schema, depth first.

    The help text is ``"<description> [<type>; default <value>]"``: for parsers that show the options
    with a generic metavar (the Kubernetes commands).
    """
    for section in schema_sections(model):
        for option in section.options:
            default = "required" if option.default is None else f"default {option.default}"
            yield f"{prefix}{option.dotted}", f"{option.description} [{option.metavar}; {default}]".strip()


class OneLineHelpFormatter(argparse.HelpFormatter):
    """Help with one line per option (never wrapped: a terminal wraps what is wider than it)."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 46, width: int | None = None) -> None:
        super().__init__(prog, indent_increment, max_help_position, width)

    def _split_lines(self, text: str, width: int) -> list[str]:  # noqa: ARG002 - argparse's signature
        return [" ".join(text.split())]

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        # Descriptions and epilogs are wrapped, but never inside an option name ("--help-" / "all").
        return textwrap.fill(" ".join(text.split()), width, initial_indent=indent, subsequent_indent=indent,
                             break_on_hyphens=False)


class _HelpAllAction(argparse.Action):
    """``--help-all``: show the help with the hidden options too, then exit."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, default: Any = argparse.SUPPRESS,
                 help: str | None = None) -> None:  # noqa: A002 - argparse's keyword
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        for action in parser._actions:
            if hasattr(action, "hidden_help"):
                action.help = action.hidden_help
        for group in parser._action_groups:
            if hasattr(group, "hidden_description"):
                group.description = group.hidden_description
        parser.epilog = None
        parser.print_help()
        parser.exit()


def add_schema_options(parser: argparse.ArgumentParser, *, hidden: Collection[str] = (),
                       model: type[BaseModel] = PipelineConfig) -> None:
    """Add every schema field as ``--section.field VALUE`` (dest ``override:section.field``), one
    argument group per section, and a ``--help-all`` option.

    ``hidden``: sections (top-level like ``"cluster"`` with their subsections, or a subsection like
    ``"evaluate.dynamic"``; ``"*"`` for all) whose options are accepted but left out of ``--help``;
    ``--help-all`` shows them.
    """
    hidden = (hidden,) if isinstance(hidden, str) else tuple(hidden)  # "cluster" is one section, not letters
    for section in schema_sections(model):
        is_hidden = _ALL_SECTIONS in hidden or section.top in hidden or any(
            section.name == h or section.name.startswith(h + ".") for h in hidden)
        # A group with a description is printed even when all its options are hidden: keep it for --help-all.
        group = parser.add_argument_group(section.name or "experiment", None if is_hidden else section.description)
        if is_hidden:
            group.hidden_description = section.description  # type: ignore[attr-defined]
        for option in section.options:
            help_text = option.help.replace("%", "%%")
            action = group.add_argument(option.flag, dest=f"{OVERRIDE_PREFIX}{option.dotted}", metavar=option.metavar,
                                        help=argparse.SUPPRESS if is_hidden else help_text)
            if is_hidden:
                action.hidden_help = help_text  # type: ignore[attr-defined]
    if not hidden:
        shown = "every option"
    elif _ALL_SECTIONS in hidden:
        shown = "every option (also the config overrides)"
    else:
        shown = "every option (also the hidden " + " and ".join(f"--{s}.*" for s in sorted(hidden)) + " ones)"
    parser.add_argument(HELP_ALL, action=_HelpAllAction, help=f"show {shown}, then exit")


class OptionParser(argparse.ArgumentParser):
    """An ArgumentParser that reports an unknown argument itself, with the closest real option.

    argparse leaves a subcommand's unknown arguments to the top-level parser, whose error shows the
    top-level usage; this parser (subparsers are created with the parent's class) rejects them where
    they were given: ``python -m pipeline train: error: unknown option --train.steps; did you mean
    --train.max_steps?`` under the subcommand's usage. It never returns leftovers.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", OneLineHelpFormatter)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args: Any = None, namespace: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(self.unknown_argument_message(extras))
        return namespace, extras

    def _subcommands_with(self, option: str) -> list[str]:
        """The subcommands of this parser that have ``option``."""
        if self._subparsers is None:
            return []
        return [name for action in self._subparsers._group_actions if isinstance(action, argparse._SubParsersAction)
                for name, sub in action.choices.items() if option in sub._option_string_actions]

    def _long_options(self) -> list[str]:
        return [s for action in self._actions for s in action.option_strings if s.startswith("--")]

    def unknown_argument_message(self, extras: list[str]) -> str:
        """The error for arguments this parser does not know (the first one is named)."""
        first = extras[0]
        if not first.startswith("-") or len(first) < 2:
            return f"unexpected argument {first!r} (an option takes one value: --section.field VALUE)"
        name = first.split("=", 1)[0]
        commands = self._subcommands_with(name)
        if commands:  # `python -m pipeline --verbose train`: an option of the command, given before it
            return f"unknown option {name} here; give it after the command: {self.prog} {commands[0]} ... {name}"
        options = self._long_options()
        # Shown options first: a hidden section (cluster, the other task's) is suggested only when nothing
        # shown is close, or when the name is in that section.
        shown = [s for a in self._actions if not hasattr(a, "hidden_help") for s in a.option_strings if s.startswith("--")]
        suggestions = _suggestions(name, shown) or _suggestions(name, options)
        if len(suggestions) == 1:
            return f"unknown option {name}; did you mean {suggestions[0]}?"
        if suggestions:
            return f"unknown option {name}; did you mean one of {', '.join(suggestions)}?"
        section = name[2:].rpartition(".")[0]
        # The section's own options (not its subsections'): `--evaluate.foo` lists --evaluate.bptt, ...
        in_section = [o for o in options if section and o.startswith(f"--{section}.")
                      and "." not in o[len(section) + 3:]]
        if in_section and len(in_section) <= _MAX_LISTED:
            return f"unknown option {name}; the {section}.* options are {', '.join(in_section)}"
        top = name[2:].split(".", 1)[0]
        hidden = any(hasattr(a, "hidden_help") and a.option_strings[0].startswith(f"--{top}.") for a in self._actions)
        return f"unknown option {name}; see {self.prog} {HELP_ALL if hidden else '--help'}"


def _suggestions(name: str, options: list[str]) -> list[str]:
    """The options ``name`` was most likely meant to be (none when nothing is close).

    In a known section, its own fields that start with the name (``--train.max``) or are spelt like it
    (``--train.steps`` -> ``--train.max_steps``), else the same field in another section
    (``--train.lr`` -> ``--train.optimizer.lr``): comparing whole names there would make every
    ``--train.*`` option look close. A misspelt section: the closest whole name. No section: the same
    field in any section (``--batch_size``), else the closest name. Names are compared without "--".
    """
    by_bare = {o[2:]: o for o in options if o != name}
    section, _, leaf = name[2:].rpartition(".")
    same_leaf = sorted((o for b, o in by_bare.items() if b.rpartition(".")[2] == leaf),
                       key=lambda o: -difflib.SequenceMatcher(None, name, o).ratio())[:_MAX_SUGGESTIONS]
    if section and any(b.startswith(f"{section}.") for b in by_bare):
        rests = {b[len(section) + 1 :]: o for b, o in by_bare.items() if b.startswith(f"{section}.")}
        prefixed = [o for rest, o in rests.items() if leaf and rest.startswith(leaf)]
        close = [rests[r] for r in difflib.get_close_matches(leaf, list(rests), n=1)]
        return (prefixed or close or same_leaf)[:_MAX_SUGGESTIONS]
    closest = [by_bare[b] for b in difflib.get_close_matches(name[2:], list(by_bare), n=1)]
    return (closest or same_leaf) if section else (same_leaf or closest)
