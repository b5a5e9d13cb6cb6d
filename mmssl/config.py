"""Configuration: ``defaults.yaml`` < recipe YAML < ``key=value`` overrides (OmegaConf).

Unknown keys are errors that name the key; the sections listed in ``OPEN_SECTIONS`` take
extra keys, because they are keyword arguments of a registered builder, which checks them.
A value of the wrong type is an error naming the key too: every merged config is checked
against the defaults (:func:`check_value`: an int key takes only ints, a float key ints or
floats, a bool key only bools, a list key only lists; a key whose default is null or
mandatory takes anything), so no key of any command reaches code that expects a number with a
string. The builders of the open sections check their keys the same way, against their own
defaults (``mmssl.runs.check_options``). YAML that does not parse, in a file or an override,
is one line naming the file (and line) or the override. The resolved config is saved beside
every run (``save_resolved``).
"""

from __future__ import annotations

import copy
import io
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from mmssl.errors import ConfigError, DataError
from mmssl.files import read_text

CONFIG_DIR = Path(__file__).parent / "configs"
DEFAULTS = CONFIG_DIR / "defaults.yaml"
CONFIG_FILE = "config.yaml"  # the resolved config in every run folder
OPEN_SECTIONS = ("objective", "model")


def find_recipe(recipe: str | Path) -> Path:
    """A recipe path, or the name of a recipe shipped in ``mmssl/configs`` (with or without .yaml)."""
    path = Path(recipe)
    if path.is_file():
        return path
    for candidate in (CONFIG_DIR / f"{recipe}.yaml", CONFIG_DIR / str(recipe)):
        if candidate.is_file():
            return candidate
    shipped = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if p.stem != "defaults"))
    raise ConfigError(f"recipe {str(recipe)!r} not found (a path, or one of: {shipped})")


def _yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error in one line: what is wrong, and the line (1 = first) where it was found."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    return f"line {mark.line + 1}: {problem}" if mark is not None else problem


def load_yaml(path: str | Path) -> DictConfig:
    """A YAML config file (a recipe, a run's ``config.yaml``) as a ``DictConfig``; a file that
    cannot be read, is not UTF-8, does not parse or is not a mapping is a ``ConfigError``."""
    path = Path(path)
    try:
        cfg = OmegaConf.load(io.StringIO(read_text(path)))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({_yaml_problem(err)})") from None
    except DataError as err:  # not UTF-8: the message names the file and line
        raise ConfigError(str(err)) from None
    except (OSError, OmegaConfBaseException, ValueError) as err:
        raise ConfigError(f"{path}: cannot read config: {err}") from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{path}: a config must be a mapping of keys")
    return cfg


def _type_name(kind: type) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        kind, f"a {kind.__name__}"
    )


def _takes(kind: type, value: Any) -> bool:
    """Whether a key whose default is of type ``kind`` takes ``value``."""
    if kind is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if kind is int:
        return isinstance(value, int)
    if kind is float:
        return isinstance(value, (int, float))
    if kind is str:  # a path or a name may be written as a number (`train.out_dir=2024`)
        return isinstance(value, (str, int, float))
    if kind is list:
        return isinstance(value, (list, tuple, ListConfig))
    if kind is dict:
        return isinstance(value, (dict, DictConfig))
    return True


def value_kind(default: Any) -> type | None:
    """The type a key takes, from its default; None (anything) for a null default."""
    if default is None:
        return None
    if isinstance(default, (ListConfig, list, tuple)):
        return list
    if isinstance(default, (DictConfig, dict)):
        return dict
    return type(default) if isinstance(default, (bool, int, float, str)) else None


def check_value(key: str, value: Any, kinds: Iterable[type | None]) -> None:
    """``ConfigError`` naming ``key`` unless ``value`` is of one of ``kinds`` (None in ``kinds``:
    the key also takes null). An int key takes only ints, a float key ints or floats, a bool key
    only bools; the items of a list are not checked here."""
    kinds = list(kinds)
    if value is None and None in kinds:
        return
    typed = [k for k in kinds if k is not None]
    if not typed or any(_takes(k, value) for k in typed):
        return
    wanted = " or ".join(_type_name(k) for k in typed) + (" (or null)" if None in kinds else "")
    shown = OmegaConf.to_container(value) if isinstance(value, (DictConfig, ListConfig)) else value
    raise ConfigError(f"config key {key} must be {wanted}, got {shown!r}")


def _leaves(cfg: DictConfig, prefix: str = "") -> Iterable[str]:
    for key in cfg.keys():
        full = f"{prefix}{key}"
        node = cfg._get_node(key)
        if isinstance(node, DictConfig) and not node._is_missing() and not node._is_none():
            yield from _leaves(node, f"{full}.")
        else:
            yield full


_ABSENT = object()


def _select(cfg: DictConfig, key: str) -> tuple[bool, Any]:
    """``(found, value)`` of ``key`` with interpolations resolved; not found when the key is
    absent, mandatory (``???``) or its interpolation cannot be resolved yet."""
    try:
        value = OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=True)
    except (OmegaConfBaseException, ValueError):
        return False, None
    return value is not _ABSENT, value


def _interpolated_kind(cfg: DictConfig, key: str) -> type | None:
    """The type of a default that interpolates a key not set yet: text around an interpolation
    (``runs/${objective.name}``) is a string; a bare ``${other.key}`` is not known."""
    node: Any = cfg
    for part in key.split("."):
        node = node._get_node(part) if isinstance(node, DictConfig) else None
    raw = node._value() if node is not None else None
    if isinstance(raw, str) and "${" in raw and not (raw.startswith("${") and raw.endswith("}")):
        return str
    return None


def check_types(cfg: DictConfig, defaults: DictConfig) -> None:
    """Every key of ``cfg`` that has a typed default in ``defaults`` holds a value of that type
    (:func:`check_value`); list items are checked against the default list's items when these
    are all of one type. Mandatory and null defaults take anything. A number given to a string
    key becomes its text (YAML reads ``train.out_dir=2024`` as an int)."""
    for key in _leaves(defaults):
        found, default = _select(defaults, key)
        kind = value_kind(default) if found else _interpolated_kind(defaults, key)
        if kind is None or kind is dict:
            continue
        found, value = _select(cfg, key)
        if not found:
            continue
        check_value(key, value, [kind])
        if kind is str and not isinstance(value, str):  # `train.out_dir=2024` is a folder name
            OmegaConf.update(cfg, key, str(value), merge=False)
        if kind is list and len(default) and len({value_kind(d) for d in default}) == 1:
            item = value_kind(default[0])
            for index, entry in enumerate(value):
                check_value(f"{key}[{index}]", entry, [item])


def _parse_overrides(overrides: Iterable[str]) -> DictConfig:
    items = list(overrides)
    for item in items:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r} is not of the form key=value")
    for item in items:  # one at a time, to name the one that does not parse
        try:
            OmegaConf.from_dotlist([item])
        except yaml.YAMLError as err:
            value = item.split("=", 1)[1]
            problem = getattr(err, "problem", None) or "not valid YAML"
            raise ConfigError(
                f"override {item!r}: the value {value!r} is not valid YAML ({problem})"
            ) from None
        except OmegaConfBaseException as err:
            raise ConfigError(f"cannot parse override {item!r}: {err}") from None
    try:
        return OmegaConf.from_dotlist(items)
    except OmegaConfBaseException as err:
        raise ConfigError(f"cannot parse overrides {items}: {err}") from None


def _container_clash(base: Any, extra: Any, prefix: str = "") -> str | None:
    """The first key where ``extra`` puts a list in place of a mapping of ``base`` or the reverse."""
    if not isinstance(base, DictConfig) or not isinstance(extra, DictConfig):
        return None
    for key in extra.keys():
        if key not in base:
            continue
        old, new = base._get_node(key), extra._get_node(key)
        kinds = {type(n) for n in (old, new) if isinstance(n, (DictConfig, ListConfig)) and not n._is_none()}
        if len(kinds) == 2:
            return f"{prefix}{key}"
        found = _container_clash(old, new, f"{prefix}{key}.")
        if found:
            return found
    return None


def _merge(base: DictConfig, extra: DictConfig, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, extra)  # type: ignore[return-value]
    except ConfigKeyError as err:
        key = err.full_key or getattr(err, "key", "?")
        raise ConfigError(f"{source}: unknown config key {key!r}") from None
    except OmegaConfBaseException as err:
        raise ConfigError(f"{source}: {err}") from None
    except TypeError:  # OmegaConf's "Cannot merge incompatible container types"
        key = _container_clash(base, extra) or "?"
        raise ConfigError(f"{source}: config key {key} cannot change between a mapping and a list") from None


def load_config(
    recipe: str | Path | None = None,
    overrides: Iterable[str] = (),
    defaults: Path = DEFAULTS,
) -> DictConfig:
    """Merge defaults < recipe < overrides; raise ``ConfigError`` naming any unknown key."""
    default_cfg = load_yaml(defaults)
    cfg = copy.deepcopy(default_cfg)
    OmegaConf.set_struct(cfg, True)
    for section in OPEN_SECTIONS:
        if section in cfg:
            OmegaConf.set_struct(cfg[section], False)
    if recipe is not None:
        path = find_recipe(recipe)
        recipe_cfg = load_yaml(path)
        cfg = _merge(cfg, recipe_cfg, str(path))
        # a merge keeps the earlier value where the later one is ``???``: a recipe that makes a
        # key mandatory (``data.labels: ???`` in hubert.yaml) would otherwise leave its default
        for key in OmegaConf.missing_keys(recipe_cfg):
            OmegaConf.update(cfg, key, "???", force_add=True)
    cfg = _merge(cfg, _parse_overrides(overrides), "command line")
    check_types(cfg, default_cfg)
    return cfg


def load_run_config(
    recipe: str | Path | None, overrides: Iterable[str] = (), resume: bool = False, defaults: Path = DEFAULTS
) -> DictConfig:
    """``load_config``; but with ``resume`` and a run already in ``train.out_dir``, that run's
    saved ``config.yaml`` < the command-line overrides: a resumed run keeps the settings it
    started with (a key given again on the command line still wins; ``mmssl.runs.check_resume``
    refuses the ones a run cannot change). A recipe of another objective than the run's is a
    ``ConfigError``: the recipe's other values are not read again."""
    cfg = load_config(recipe, overrides, defaults)
    if not resume:
        return cfg
    try:
        saved = Path(str(OmegaConf.select(cfg, "train.out_dir"))) / CONFIG_FILE
    except OmegaConfBaseException:
        return cfg
    if not saved.is_file():
        return cfg
    # under the defaults, so a run saved before a key was added still has it (its default)
    default_cfg = load_yaml(defaults)
    base = OmegaConf.merge(default_cfg, load_yaml(saved))
    wanted, kept = OmegaConf.select(cfg, "objective.name"), OmegaConf.select(base, "objective.name")
    if recipe is not None and wanted is not None and wanted != kept:
        raise ConfigError(
            f"--resume: recipe {recipe} trains objective {wanted!r} but the run in {saved.parent} is "
            f"{kept!r} ({saved}); resume it with its own recipe, or start a new run in another train.out_dir"
        )
    OmegaConf.set_struct(base, True)
    for section in OPEN_SECTIONS:
        if section in base:
            OmegaConf.set_struct(base[section], False)
    cfg = _merge(base, _parse_overrides(overrides), "command line")
    check_types(cfg, default_cfg)
    return cfg


def resolve(cfg: DictConfig) -> DictConfig:
    """Interpolate and check that no mandatory value (``???``) is left unset."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"missing value for {', '.join(missing)} (set it as key=value)")
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as err:
        raise ConfigError(str(err)) from None
    return cfg


def save_resolved(cfg: DictConfig, run_dir: Path) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / CONFIG_FILE
    OmegaConf.save(cfg, path, resolve=True)
    return path


def builder_kwargs(section: DictConfig, drop: Iterable[str] = ("name",)) -> dict:
    """A config section as plain keyword arguments for a registered builder."""
    kwargs = OmegaConf.to_container(section, resolve=True)
    assert isinstance(kwargs, dict)
    for key in drop:
        kwargs.pop(key, None)
    return kwargs
