"""Reading a config, whatever its schema (a job's, a training's): YAML text in which a key given twice is an error,
`--set KEY=VALUE` overrides typed by the schema, and pydantic's errors as `key.path: message` lines."""

from __future__ import annotations

from types import UnionType
from typing import Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError


class ConfigError(ValueError):
    """A job config that cannot be used; the message names the key path."""


def apply_override(data: dict[str, Any], assignment: str, root: type[BaseModel]) -> None:
    """Apply one `--set` override in place.

    `a.b.c=VALUE` sets a key (or a list item, `a.list.0=VALUE`); `a.list+=VALUE` appends to a list. The
    value is parsed as YAML (`3`, `true`, `[1, 2]`, `{k: v}`), except where the schema wants a string
    (`prompt.template={prompt}, {caption}` and `negative=yes` stay text) or the text is not valid YAML;
    a single value given for a list of strings replaces the list with that one item."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE or KEY+=VALUE")
    key, raw = assignment.split("=", 1)
    append = key.endswith("+")
    parts = key.removesuffix("+").strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {assignment!r}: empty key segment")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        node = _child(node, part, ".".join(parts[: i + 1]), create=True)
    wanted = _annotation(parts, root)
    value = _parse_value(raw, wanted, append)
    last = parts[-1]
    if append:
        current = node.get(last, []) if isinstance(node, dict) else node[_index(node, last, key)]
        if not isinstance(current, list):
            raise ConfigError(f"--set {assignment!r}: {'.'.join(parts)} is not a list")
        value = current + (value if isinstance(value, list) else [value])
    if isinstance(node, list):
        node[_index(node, last, key)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"--set {assignment!r}: {'.'.join(parts[:-1])} is not a mapping or list")


def _parse_value(raw: str, wanted: Any, append: bool) -> Any:
    item, structured = _list_item(wanted), raw.lstrip().startswith(("[", "{"))
    if _is_str(wanted) or (append and _is_str(item)) or (str in union_members(wanted) and not structured):
        return raw
    if _is_str(item) and not structured:
        return [raw]  # a list of strings given one string
    try:
        return yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        return raw  # not YAML: the text itself


def _annotation(parts: list[str], root: type[BaseModel]) -> Any:
    """The type the config schema (`root`) declares at a dotted key (None where it does not say)."""
    model: Any = root
    annotation: Any = None
    for part in parts:
        model = _model_of(annotation) if annotation is not None else model
        if part.isdigit():
            annotation = _list_item(annotation)
            continue
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return None
        annotation = model.model_fields[part].annotation
    return annotation


def union_members(annotation: Any) -> list[Any]:
    """The members of a union (`X | None`), or the annotation itself."""
    return [a for a in get_args(annotation) if a is not type(None)] if get_origin(annotation) in (Union, UnionType) \
        else [annotation]


def _model_of(annotation: Any) -> Any:
    return next((a for a in union_members(annotation) if isinstance(a, type) and issubclass(a, BaseModel)), None)


def _list_item(annotation: Any) -> Any:
    for a in union_members(annotation):
        if get_origin(a) is list:
            return get_args(a)[0]
    return None


def _is_str(annotation: Any) -> bool:
    return annotation is not None and union_members(annotation) == [str]


def _index(node: list, part: str, path: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"--set: {path}: list index {part!r} out of range (length {len(node)})")
    return int(part)


def _child(node: Any, part: str, path: str, create: bool) -> Any:
    if isinstance(node, list):
        return node[_index(node, part, path)]
    if not isinstance(node, dict):
        raise ConfigError(f"--set: {path} is not a mapping")
    if create and node.get(part) is None:  # absent, or null as a manifest writes an unused section
        node[part] = {}
    return node[part]


class _UniqueKeys(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (it kept the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} is given twice (again on line {key_node.start_mark.line + 1})")
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_yaml(text: str) -> Any:
    """YAML text as Python values, as `yaml.safe_load` reads it, except that a repeated key is an error."""
    return yaml.load(text, Loader=_UniqueKeys)  # a SafeLoader


def format_errors(e: ValidationError) -> str:
    """pydantic's errors as `key.path: message` lines joined by `; `."""
    return "; ".join(error_lines(e))


def error_lines(e: ValidationError, prefix: str = "") -> list[str]:
    """pydantic's errors as `key.path: message` lines, the key after `prefix` (a section validated on its own). A
    value that fits none of a field's types (`batch_size`: a number or 'auto') gets one line: the key, and what each
    type wanted, joined by "or"."""
    by_key: dict[str, list[str]] = {}
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"] if not _union_member(p)) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        by_key.setdefault(prefix + loc if err["loc"] else "", []).append(msg)
    return [f"{loc}: {' or '.join(msgs)}" if loc else " or ".join(msgs) for loc, msgs in by_key.items()]


def _union_member(part: Any) -> bool:
    """A part of pydantic's error location that names one type of a union (`constrained-int`, `literal['auto']`,
    `int`), not a key: the config's keys are identifiers, and none is named after a type."""
    return isinstance(part, str) and (not part.isidentifier() or part in {"int", "float", "str", "bool", "none"})


def yes_no_number(value: Any, annotation: Any) -> str | None:
    """A boolean in `value` where `annotation` wants a number, as written (`true`, or `key: true` inside a mapping
    or list of numbers); None where there is none."""
    kinds = union_members(annotation)
    if isinstance(value, bool):
        return str(value).lower() if bool not in kinds and Any not in kinds and (int in kinds or float in kinds) else None
    for kind in kinds:
        args = get_args(kind)
        items = value.items() if get_origin(kind) is dict and isinstance(value, dict) else \
            enumerate(value) if get_origin(kind) is list and isinstance(value, list) else ()
        for key, item in items:
            if isinstance(item, bool) and (leaf := yes_no_number(item, args[-1])) is not None:
                return f"{key}: {leaf}"
    return None
