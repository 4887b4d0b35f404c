"""Configs as data: frozen dataclasses, a YAML/TOML file whose keys mirror the CLI flags, flags win.

Each stage declares one dataclass whose fields carry their help text (``option(default, "help")``) and the
paper's value as default. The CLI builds its flags from the dataclass (``add_config_args``) and
``resolve_config`` merges default < file < flag, rejecting unknown keys. Nothing here holds a path.

One vocabulary for every command (``--steps``, ``--size``, ``--dtype bf16|fp16|fp32``, ``--model``, ``--lora``,
``-o/--output``): a field whose name predates it names its flag with ``option(..., flag="steps")``; the old
spelling (the field name, and any ``aliases``) stays a hidden flag and config key for one release and prints a
deprecation message when used.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

T = TypeVar("T")
_UNSET = object()
Dtype = Literal["bf16", "fp16", "fp32"]  # the one spelling of a model precision, on every command
SpeedProfile = Literal["eager", "compiled", "fp8", "offload"]  # appleswap.speed's named profiles
SPEED_HELP = ("speed profile that sets --fp8/--compile/--cuda-graphs/--offload at once: eager (the reference model, "
              "layer by layer), compiled (same function, fused + compiled + CUDA graphs), fp8 (compiled with e4m3 "
              "block weights), offload (fp8 blocks streamed from host memory); default: those flags")
DTYPE_SPELLINGS = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32",
                   "no": "fp32"}  # older spellings (torch names, accelerate's "no"), accepted for one release
_warned: set[str] = set()


def option(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = dataclasses.MISSING,
           flag: str | None = None, short: str | None = None, aliases: tuple[str, ...] = ()) -> Any:
    """A dataclass field with its help text (shown by ``--help``).

    ``flag``: the flag's name when it differs from the field's (``num_steps`` -> ``--steps``); the field name and
    ``aliases`` are then deprecated spellings. ``short``: a one-letter flag too (``-o``)."""
    metadata = {"help": help, "flag": flag, "short": short, "aliases": tuple(aliases)}
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def deprecated(old: str, new: str) -> None:
    """Say once per process that ``old`` is an old spelling of ``new`` (stderr: logging may not be set up yet)."""
    if old not in _warned:
        _warned.add(old)
        print(f"appleswap: {old} is deprecated, use {new} (the old spelling goes in the next release)",
              file=sys.stderr)


def canonical_dtype(value: str) -> str:
    """``bf16``/``fp16``/``fp32`` from any accepted spelling (``bfloat16``, ``float32``, accelerate's ``no``)."""
    if value in get_args(Dtype):
        return value
    if value in DTYPE_SPELLINGS:
        deprecated(f"dtype {value!r}", repr(DTYPE_SPELLINGS[value]))
        return DTYPE_SPELLINGS[value]
    raise ValueError(f"dtype must be one of {list(get_args(Dtype))}, got {value!r}")


def torch_dtype(value: str):
    """The torch dtype of a ``--dtype`` value (any accepted spelling)."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[canonical_dtype(value)]


def flag_name(field: dataclasses.Field) -> str:
    """The field's flag without dashes, as a config key: ``steps`` for ``num_steps`` with ``flag="steps"``."""
    return (field.metadata.get("flag") or field.name).replace("_", "-")


def old_spellings(field: dataclasses.Field) -> list[str]:
    """Deprecated names of a field's flag (dash form): the field name when the flag differs, and its aliases."""
    names = [field.name.replace("_", "-")] + [a.replace("_", "-") for a in field.metadata.get("aliases", ())]
    return [n for n in dict.fromkeys(names) if n != flag_name(field)]


class DeprecatedFlag(argparse.Action):
    """A hidden old spelling of a flag: stores like the new one and prints a deprecation message."""

    def __init__(self, option_strings, dest, new: str = "", **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None):
        deprecated(option_string or self.option_strings[0], self.new)
        setattr(namespace, self.dest, True if self.nargs == 0 else values)


def add_alias(parser: argparse.ArgumentParser | argparse._ArgumentGroup, old: str, new: str, dest: str,
              **kwargs: Any) -> None:
    """Keep ``old`` as a hidden, deprecated spelling of flag ``new`` (same ``dest``) for one release."""
    kwargs = {k: v for k, v in kwargs.items() if k not in ("action", "help")}
    parser.add_argument(old, dest=dest, action=DeprecatedFlag, new=new, help=argparse.SUPPRESS, **kwargs)


def load_config_file(path: str | Path | None) -> dict[str, Any]:
    """Read a ``.yaml``/``.yml``/``.toml``/``.json`` config file into a dict (empty when ``path`` is None)."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    text = path.read_text()
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text) or {}
    elif suffix == ".toml":
        import tomllib

        data = tomllib.loads(text)
    elif suffix == ".json":
        data = json.loads(text)
    else:
        raise ValueError(f"config file {path}: unknown format {suffix!r} (use .yaml, .toml or .json)")
    if not isinstance(data, dict):
        raise ValueError(f"config file {path}: top level must be a mapping, got {type(data).__name__}")  # noqa: TRY004
    return data


def _flag(prefix: str | None, name: str) -> str:
    name = name.replace("_", "-")
    return f"--{prefix.replace('_', '-')}-{name}" if prefix else f"--{name}"


def _dest(prefix: str | None, name: str) -> str:
    return f"{prefix}__{name}" if prefix else name


def _resolve_type(cls: type, field: dataclasses.Field) -> Any:
    hints = typing.get_type_hints(cls)
    return hints[field.name]


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def add_config_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, prefix: str | None = None) -> None:
    """Add one flag per field of dataclass ``cls`` (``--prefix-field-name``); defaults stay unset so that a
    config file can fill them in ``resolve_config``."""
    for field in dataclasses.fields(cls):
        if not field.init or field.name.startswith("_"):
            continue
        tp, optional = _unwrap_optional(_resolve_type(cls, field))
        default = field.default if field.default is not dataclasses.MISSING else (
            field.default_factory() if field.default_factory is not dataclasses.MISSING else None  # type: ignore[misc]
        )
        help_text = field.metadata.get("help", "")
        help_text = f"{help_text} (default: {default!r})" if help_text else f"default: {default!r}"
        kwargs: dict[str, Any] = {"dest": _dest(prefix, field.name), "default": argparse.SUPPRESS, "help": help_text}
        origin = get_origin(tp)
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif tp == Dtype:
            kwargs["choices"] = list(get_args(Dtype))
            kwargs["type"] = _dtype_arg
        elif origin is Literal:
            choices = list(get_args(tp))
            kwargs["choices"] = choices
            kwargs["type"] = type(choices[0])
        elif origin in (list, tuple):
            inner = get_args(tp)[0] if get_args(tp) else str
            kwargs["nargs"] = "+"
            kwargs["type"] = inner if inner in (int, float, str) else str
        elif tp in (int, float) and optional:
            kwargs["type"] = _or_none(tp)
        elif tp in (int, float, str):
            kwargs["type"] = tp
        elif tp is Path:
            kwargs["type"] = Path
        else:
            kwargs["type"] = str
        flag = _flag(prefix, flag_name(field))
        if "choices" not in kwargs and "action" not in kwargs:
            kwargs["metavar"] = flag[2:].upper().replace("-", "_")  # the flag's word, not the field's
        short = field.metadata.get("short")
        parser.add_argument(*([short] if short and not prefix else []), flag, **kwargs)
        for old in old_spellings(field):
            if tp is bool:
                raise ValueError(f"{cls.__name__}.{field.name}: boolean flags keep their name")
            add_alias(parser, _flag(prefix, old), flag, **kwargs)


def _or_none(tp: type):
    """``int``/``float`` that also reads ``none``/``null`` as None (an optional number turned off)."""
    def convert(value: str):
        return None if value.lower() in ("none", "null") else tp(value)

    convert.__name__ = tp.__name__  # argparse names the type in its error message
    return convert


def _dtype_arg(value: str) -> str:
    try:
        return canonical_dtype(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def _coerce(cls: type, field: dataclasses.Field, value: Any) -> Any:
    tp, _ = _unwrap_optional(_resolve_type(cls, field))
    if value is None:
        return None
    origin = get_origin(tp)
    if tp == Dtype and isinstance(value, str):
        value = canonical_dtype(value)
    if origin is Literal and value not in get_args(tp):
        raise ValueError(f"`{field.name}`: {value!r} is not one of {list(get_args(tp))}")
    if tp is Path:
        return Path(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin is tuple:
        return tuple(value)
    if origin is list:
        return list(value)
    if tp in (int, float, str, bool) and not isinstance(value, tp):
        raise ValueError(f"`{field.name}`: expected {tp.__name__}, got {value!r}")
    return value


def resolve_config(cls: type[T], args: argparse.Namespace | None = None, file_data: dict[str, Any] | None = None,
                   prefix: str | None = None, **overrides: Any) -> T:
    """Build ``cls`` from its defaults, then the config file section, then explicit flags, then ``overrides``.

    ``file_data`` is the whole file; the section named ``prefix`` is used when present (flat files work too).
    Unknown keys raise ``ValueError`` naming them and the allowed keys.
    """
    names = {f.name: f for f in dataclasses.fields(cls) if f.init}
    keys = config_keys(cls)
    values: dict[str, Any] = {}
    section = (file_data or {})
    if prefix and isinstance(section.get(prefix), dict):
        section = section[prefix]
    elif prefix:
        section = {k: v for k, v in section.items() if not isinstance(v, dict)}
    for key, value in section.items():
        if isinstance(value, dict):
            continue  # another stage's section
        name = key.replace("_", "-")
        if name not in keys:
            allowed = sorted({flag_name(f) for f in names.values()})
            raise ValueError(f"unknown config key {key!r} for {cls.__name__}; allowed: {allowed}")
        field = keys[name]
        if name != flag_name(field):
            deprecated(f"config key {key!r}", repr(flag_name(field)))
        values[field.name] = _coerce(cls, field, value)
    if args is not None:
        for name, field in names.items():
            value = getattr(args, _dest(prefix, name), _UNSET)
            if value is not _UNSET:
                values[name] = _coerce(cls, field, value)
    for name, value in overrides.items():
        if name not in names:
            raise ValueError(f"unknown option {name!r} for {cls.__name__}; allowed: {sorted(names)}")
        values[name] = _coerce(cls, names[name], value)
    return cls(**values)


def config_keys(cls: type) -> dict[str, dataclasses.Field]:
    """Every accepted config key of ``cls`` (dash form: its flags, then the deprecated spellings) -> its field."""
    fields = [f for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")]
    keys = {flag_name(f): f for f in fields}
    for field in fields:
        for old in old_spellings(field):
            keys.setdefault(old, field)
    return keys


def config_to_dict(config: Any) -> dict[str, Any]:
    """JSON-ready dict of a (possibly nested) config dataclass, for writing next to every output."""
    def convert(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: convert(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, (list, tuple)):
            return [convert(v) for v in value]
        return value

    return convert(config)

