"""Configuration: ``defaults.yaml`` < recipe YAML < ``key=value`` overrides (OmegaConf).

Unknown keys are errors that name the key; the sections listed in ``OPEN_SECTIONS`` take
extra keys, because they are keyword arguments of a registered builder, which checks them.
The resolved config is saved beside every run (``save_resolved``).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from mmssl.errors import ConfigError

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


def _load_yaml(path: Path) -> DictConfig:
    try:
        cfg = OmegaConf.load(path)
    except (OSError, OmegaConfBaseException, ValueError) as err:
        raise ConfigError(f"{path}: cannot read config: {err}") from err
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{path}: a config must be a mapping of keys")
    return cfg


def _parse_overrides(overrides: Iterable[str]) -> DictConfig:
    items = list(overrides)
    for item in items:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r} is not of the form key=value")
    try:
        return OmegaConf.from_dotlist(items)
    except OmegaConfBaseException as err:
        raise ConfigError(f"cannot parse overrides {items}: {err}") from err


def _merge(base: DictConfig, extra: DictConfig, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, extra)  # type: ignore[return-value]
    except ConfigKeyError as err:
        key = err.full_key or getattr(err, "key", "?")
        raise ConfigError(f"{source}: unknown config key {key!r}") from None
    except OmegaConfBaseException as err:
        raise ConfigError(f"{source}: {err}") from None


def load_config(
    recipe: str | Path | None = None,
    overrides: Iterable[str] = (),
    defaults: Path = DEFAULTS,
) -> DictConfig:
    """Merge defaults < recipe < overrides; raise ``ConfigError`` naming any unknown key."""
    cfg = _load_yaml(defaults)
    OmegaConf.set_struct(cfg, True)
    for section in OPEN_SECTIONS:
        if section in cfg:
            OmegaConf.set_struct(cfg[section], False)
    if recipe is not None:
        path = find_recipe(recipe)
        recipe_cfg = _load_yaml(path)
        cfg = _merge(cfg, recipe_cfg, str(path))
        # a merge keeps the earlier value where the later one is ``???``: a recipe that makes a
        # key mandatory (``data.labels: ???`` in hubert.yaml) would otherwise leave its default
        for key in OmegaConf.missing_keys(recipe_cfg):
            OmegaConf.update(cfg, key, "???", force_add=True)
    cfg = _merge(cfg, _parse_overrides(overrides), "command line")
    return cfg


def load_run_config(
    recipe: str | Path | None, overrides: Iterable[str] = (), resume: bool = False, defaults: Path = DEFAULTS
) -> DictConfig:
    """``load_config``; but with ``resume`` and a run already in ``train.out_dir``, that run's
    saved ``config.yaml`` < the command-line overrides: a resumed run keeps the settings it
    started with (a key given again on the command line still wins)."""
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
    base = OmegaConf.merge(_load_yaml(defaults), _load_yaml(saved))
    OmegaConf.set_struct(base, True)
    for section in OPEN_SECTIONS:
        if section in base:
            OmegaConf.set_struct(base[section], False)
    return _merge(base, _parse_overrides(overrides), "command line")


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
