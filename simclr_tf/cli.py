"""Command-line flags: the reference SimCLR flags and ours, and nothing else.

This is the only module that defines or reads absl flags. There is one
flag per field of `simclr_tf.config.Config`, defined here from the field:
its name, type, default and help text (`field.metadata`); a string field
with `choices` is an enum flag. Flag names and defaults follow the
reference implementation (SPEC.md §1) so its README commands run
unchanged; `use_tpu` defaults to False here.
"""

from __future__ import annotations

import dataclasses
import types
import typing

from absl import flags

from simclr_tf import config as config_lib

# Field type (None stripped) -> the absl function that defines its flag.
_DEFINERS = {
    bool: flags.DEFINE_bool,
    int: flags.DEFINE_integer,
    float: flags.DEFINE_float,
    str: flags.DEFINE_string,
}


def _flag_type(hint: typing.Any) -> type:
    """`int` for `int` and `int | None`, and so on."""
    if isinstance(hint, types.UnionType):
        (hint,) = (t for t in typing.get_args(hint) if t is not type(None))
    return hint


def _define_flags() -> None:
    """Defines one flag per config field (called once, at import)."""
    for group in config_lib.GROUPS.values():
        hints = typing.get_type_hints(group)
        for f in dataclasses.fields(group):
            kind = _flag_type(hints[f.name])
            help_text = f.metadata["help"]
            choices = f.metadata.get("choices")
            if kind is str and choices:
                flags.DEFINE_enum(f.name, f.default, choices, help_text)
            else:
                _DEFINERS[kind](f.name, f.default, help_text)


_define_flags()

FLAGS = flags.FLAGS

# Names of the flags this module defines: the flags that make up a run.
FLAG_NAMES = tuple(config_lib.field_names())


# The arguments that ask for help (absl's --help, --helpshort and -?).
HELP_ARGS = ("--help", "-help", "--helpshort", "-helpshort", "-?")


def _flag_help(name: str) -> str:
    """One flag's entry, as absl's --helpfull renders it."""
    flag = FLAGS[name]
    shown = f"--[no]{name}" if flag.boolean else f"--{name}"
    text = f"{shown}: {flag.help}"
    if flag.default is not None:
        text += f"\n(default: {flag.default_as_str})"
    return flags.text_wrap(text, indent="    ", firstline_indent="  ")


def help_text() -> str:
    """Our flags with their help and defaults, grouped as the config is
    (data, model, loss, optim, train, eval, runtime), each group headed by
    its docstring's first line."""
    parts = []
    for group_name, group in config_lib.GROUPS.items():
        summary = group.__doc__.strip().splitlines()[0]
        parts.append(f"\n{group_name} flags: {summary}")
        parts += [_flag_help(f.name) for f in dataclasses.fields(group)]
    parts.append(
        "\n--flagfile=FILE reads flags from FILE (e.g. flags/*.cfg); "
        "--helpfull also lists absl's own flags."
    )
    return "\n".join(parts) + "\n"


def config_from_flags() -> config_lib.Config:
    """Reads every flag once and returns the checked, frozen config.

    Raises:
      ConfigError: an invalid value, with a message naming it.
    """
    return config_lib.from_flat(
        {name: FLAGS[name].value for name in FLAG_NAMES}
    )


def flags_file_text(config: config_lib.Config | None = None) -> str:
    """`config_lib.flags_text` of `config` (default: the parsed flags')."""
    return config_lib.flags_text(config or config_from_flags())


def write_flags_file(
    model_dir: str, config: config_lib.Config | None = None
) -> None:
    """Writes `model_dir/flags.cfg` (`config_lib.write_flags_file`) for
    `config`, default the parsed flags' config."""
    config_lib.write_flags_file(config or config_from_flags(), model_dir)
