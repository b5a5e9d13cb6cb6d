import pytest
from omegaconf import OmegaConf

from mmssl.config import builder_kwargs, load_config, resolve, save_resolved
from mmssl.errors import ConfigError


def _recipe(tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_defaults_recipe_overrides_order(tmp_path):
    recipe = _recipe(tmp_path, "objective:\n  name: hubert\n  mask_prob: 0.5\ntrain:\n  max_steps: 7\n")
    cfg = load_config(recipe, ["train.max_steps=9", "data.train=x.jsonl", "objective.mask_prob=0.7"])
    assert cfg.train.max_steps == 9  # override beats recipe
    assert cfg.objective.mask_prob == 0.7
    assert cfg.train.save_every == 500  # from defaults
    assert builder_kwargs(cfg.objective) == {"mask_prob": 0.7}


def test_unknown_key_is_named(tmp_path):
    recipe = _recipe(tmp_path, "objective:\n  name: hubert\ntrain:\n  max_stepz: 7\n")
    with pytest.raises(ConfigError, match="max_stepz") as err:
        load_config(recipe)
    assert "recipe.yaml" in str(err.value)
    with pytest.raises(ConfigError, match="data.trian"):
        load_config(None, ["data.trian=x"])


def test_bad_override_and_missing_value(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.max_steps"])
    with pytest.raises(ConfigError, match="objective.name"):
        resolve(load_config(None, ["data.train=a.jsonl"]))


def test_a_recipe_can_make_a_defaulted_key_mandatory(tmp_path):
    recipe = _recipe(tmp_path, "objective:\n  name: hubert\ndata:\n  labels: ???\n")
    with pytest.raises(ConfigError, match="data.labels"):
        resolve(load_config(recipe, ["data.train=a.jsonl"]))
    assert resolve(load_config(recipe, ["data.train=a.jsonl", "data.labels=km"])).data.labels == "km"
    with pytest.raises(ConfigError, match="data.labels"):  # the shipped recipe says so too
        resolve(load_config("hubert", ["data.train=a.jsonl"]))


def test_missing_recipe_lists_shipped(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_resolved_config_is_saved(tmp_path):
    cfg = resolve(load_config(None, ["objective.name=apc", "data.train=a.jsonl"]))
    path = save_resolved(cfg, tmp_path / "run")
    again = OmegaConf.load(path)
    assert again.train.out_dir == "runs/apc"  # interpolation resolved
    assert again.data.train == "a.jsonl"


def test_a_resumed_run_keeps_its_saved_settings_unless_given_again(tmp_path):
    from mmssl.config import load_run_config

    out = f"train.out_dir={tmp_path / 'run'}"
    first = resolve(load_config("hubert", ["data.train=a.jsonl", "data.labels=km", "train.lr=0.123", out]))
    save_resolved(first, tmp_path / "run")
    again = resolve(load_run_config("hubert", ["data.train=a.jsonl", out, "train.max_steps=7"], resume=True))
    assert again.train.lr == 0.123 and again.data.labels == "km" and again.train.max_steps == 7
    assert resolve(load_run_config("hubert", [out, "train.lr=0.5"], resume=True)).train.lr == 0.5
    fresh = load_run_config("hubert", ["data.train=a.jsonl", "data.labels=km", out], resume=False)
    assert fresh.train.lr != 0.123
    with pytest.raises(ConfigError, match="train.lrr"):
        load_run_config("hubert", [out, "train.lrr=1"], resume=True)


def test_a_run_saved_before_a_key_existed_resumes_with_its_default(tmp_path):
    from mmssl.config import load_run_config

    out = f"train.out_dir={tmp_path / 'run'}"
    first = resolve(load_config("hubert", ["data.train=a.jsonl", "data.labels=km", "train.lr=0.123", out]))
    save_resolved(first, tmp_path / "run")
    saved = OmegaConf.load(tmp_path / "run" / "config.yaml")
    del saved.data["train_subset"]  # as written by a version without the key
    OmegaConf.save(saved, tmp_path / "run" / "config.yaml")
    again = resolve(load_run_config("hubert", [out], resume=True))
    assert again.data.train_subset is None and again.train.lr == 0.123


def test_a_key_takes_only_the_type_of_its_default(tmp_path):
    base = ["objective.name=apc", "data.train=a.jsonl"]
    for override, named in [
        ("train.max_steps=abc", "train.max_steps must be an integer"),
        ("train.max_steps=2.5", "train.max_steps must be an integer"),
        ("train.max_steps=true", "train.max_steps must be an integer"),
        ("train.lr=fast", "train.lr must be a number"),
        ("train.compile=1", "train.compile must be true or false"),
        ("data.modalities=audio", "data.modalities must be a list"),
        ("train.betas=[0.9,fast]", r"train.betas\[1\] must be a number"),
        ("train.valid_every=x", "train.valid_every must be an integer"),  # default interpolated
    ]:
        with pytest.raises(ConfigError, match=named):
            load_config(None, [*base, override])
    cfg = load_config(None, [*base, "train.lr=1", "data.valid=3", "train.out_dir=2024"])
    assert cfg.train.lr == 1 and cfg.data.valid == 3  # an int is a float; null takes anything
    assert cfg.train.out_dir == "2024"  # a number given to a string key is its text
    recipe = _recipe(tmp_path, "objective:\n  name: apc\ntrain:\n  save_every: often\n")
    with pytest.raises(ConfigError, match="train.save_every must be an integer, got 'often'"):
        load_config(recipe, ["data.train=a.jsonl"])


def test_a_saved_config_of_the_wrong_type_is_named_on_resume(tmp_path):
    from mmssl.config import load_run_config

    out = f"train.out_dir={tmp_path / 'run'}"
    first = resolve(load_config(None, ["objective.name=apc", "data.train=a.jsonl", out]))
    save_resolved(first, tmp_path / "run")
    saved = tmp_path / "run" / "config.yaml"
    saved.write_text(saved.read_text().replace("max_steps: 1000", "max_steps: lots"))
    with pytest.raises(ConfigError, match="train.max_steps must be an integer, got 'lots'"):
        load_run_config(None, ["objective.name=apc", out], resume=True)


def test_yaml_that_does_not_parse_names_the_file_line_or_override(tmp_path):
    recipe = _recipe(tmp_path, "objective:\n  name: apc\n  mask_prob: [0.5\ntrain:\n  lr: 1\n")
    with pytest.raises(ConfigError, match=r"recipe.yaml: not valid YAML \(line 4: ") as err:
        load_config(recipe)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"override 'objective.mask_prob=\[0.5'") as err:
        load_config(None, ["train.lr=1", "objective.mask_prob=[0.5"])
    assert "\n" not in str(err.value)
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(b"objective:\n  name: apc\n# caf\xe9\n")
    with pytest.raises(ConfigError, match=r"latin1.yaml:3: not UTF-8"):
        load_config(latin1)
