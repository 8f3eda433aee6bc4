"""What every command shares: mlx-lm's flag names, the old names as hidden aliases, -c/--config.

One place merges defaults < config file < flags for every command (as mlx_lm.lora does for
its own): the YAML file becomes click's `default_map`, so a flag given on the command line
wins and a value from the file is converted and checked exactly like the flag would be.
Keys are the flag names with dashes or underscores (`model`, `max-tokens`, `max_tokens`);
the old names (`base`, `text`, `system`) are accepted too; an unknown key or a value of
the wrong type is a one-line error naming the file and the key.
"""

import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import typer
from typer.core import TyperCommand, TyperOption

from .errors import UserError

# old name -> mlx-lm's name (hidden: accepted, never shown in --help)
ALIASES: Dict[str, str] = {
    "--base": "--model",
    "--text": "--prompt",
    "--system": "--system-prompt",
    "--dual-guard": "--guard",
}
CONFIG_HELP = "YAML file of flag values (keys = flag names); flags on the command line win."
# `config: Optional[Path] = CONFIG` in a command's signature gives it -c/--config
CONFIG = typer.Option(None, "-c", "--config", help=CONFIG_HELP)


# flag -> (config file, key) for the values the last parsed command took from its -c file, so that
# a check made later in the command ("--max-tokens must be >= 1") can also name where the value came from
FROM_CONFIG: Dict[str, Tuple[Path, str]] = {}


def explain(message: str) -> str:
    """`message` with the config file and key added for each flag in it whose value came from -c."""
    hits = [(flag, src) for flag, src in FROM_CONFIG.items() if re.search(re.escape(flag) + r"(?![\w-])", message)]
    if not hits:
        return message
    return message + " (" + "; ".join(f"{flag} was set by {path}: {key}" for flag, (path, key) in hits) + ")"


def _key(name: str) -> str:
    return name.lstrip("-").replace("-", "_")


def load_yaml(path: Path) -> dict:
    """A YAML mapping from `path`; errors name the file (and the line, for bad YAML)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such config file")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}:" if mark else ""
        raise UserError(f"{path}:{where} invalid YAML ({getattr(e, 'problem', e)})")
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 text file")
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a config file is a mapping of flag names to values")
    return raw


class Command(TyperCommand):
    """A typer command that speaks mlx-lm's flag names and reads -c/--config."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # a command with its own kind of config file (bench) keeps it
        self.reads_config = any(p.name == "config" and p.help == CONFIG_HELP for p in self.params)

    # ---------------------------------------------------------------- aliases

    def _options(self) -> Dict[str, TyperOption]:
        return {name: p for p in self.params if isinstance(p, TyperOption)
                for name in list(p.opts) + list(p.secondary_opts)}

    def rewrite(self, args: List[str]):
        """(args with the old flag names replaced by the current ones, the -c/--config path or None);
        option values and everything after `--` are left alone."""
        opts = self._options()
        aliases = {old: new for old, new in ALIASES.items() if new in opts and old not in opts}
        out, config, i = [], None, 0
        while i < len(args):
            a = args[i]
            if a == "--":
                out += args[i:]
                break
            name, eq, value = a.partition("=")
            if name in aliases:
                name = aliases[name]
                a = name + eq + value
            out.append(a)
            opt = opts.get(name)
            if opt is not None and not opt.is_flag and not opt.count:
                if not eq and i + 1 < len(args):
                    value = args[i + 1]
                    out.append(value)  # the option's value, whatever it looks like
                    i += 1
                if opt.name == "config":
                    config = Path(value)
            i += 1
        return out, config

    def config_values(self, ctx, path: Path) -> tuple:
        """The file's values as ({param name: converted value}, {param name: the key it was given by})."""
        by_key = {}
        for p in self.params:
            if isinstance(p, TyperOption) and p.name != "config":
                for name in [p.name] + list(p.opts):
                    by_key[_key(name)] = p
        for old, new in ALIASES.items():
            if _key(new) in by_key and _key(old) not in by_key:
                by_key[_key(old)] = by_key[_key(new)]
        values, keys = {}, {}
        for key, value in load_yaml(path).items():
            p = by_key.get(_key(str(key)))
            if p is None:
                known = sorted({_key(q.opts[0]).replace("_", "-") for q in by_key.values()})
                raise UserError(f"{path}: unknown key {key!r} for `{ctx.command_path}` (known: {', '.join(known)})")
            if value is None:
                continue
            if p.multiple and not isinstance(value, list):
                value = [value]
            try:
                if hasattr(p, "get_runtime_param"):  # typer >= 0.20 converts values itself
                    values[p.name] = p.get_runtime_param().coerce(value, param=p, ctx=ctx)
                else:
                    values[p.name] = p.type_cast_value(ctx, value)
            except typer.BadParameter as e:
                raise UserError(f"{path}: {key}: {e.message}")
            keys[p.name] = str(key)
        return values, keys

    def parse_args(self, ctx, args: List[str]) -> List[str]:
        args, path = self.rewrite(list(args))
        FROM_CONFIG.clear()
        keys = {}
        if path is not None and self.reads_config:
            values, keys = self.config_values(ctx, path)
            ctx.default_map = {**(ctx.default_map or {}), **values}
        rest = super().parse_args(ctx, args)
        for p in self.params:
            # typer may vendor its own click: compare the source by name
            if p.name in keys and getattr(ctx.get_parameter_source(p.name), "name", "") == "DEFAULT_MAP":
                for opt in p.opts:
                    FROM_CONFIG[opt] = (path, keys[p.name])
        return rest


class App(typer.Typer):
    """typer.Typer whose commands are `Command`s."""

    def command(self, *args, cls=None, **kwargs):
        return super().command(*args, cls=cls or Command, **kwargs)
