from mmssl.testing import save_tiny_run
from mmssl.train.finetune import finetune_config


def test_a_fresh_encoder_is_not_frozen_unless_asked(tmp_path, capsys):
    base = ["data.train=x.jsonl", f"train.out_dir={tmp_path / 'run'}", "objective.encoder=fbank"]
    fresh = finetune_config("ctc", base, "none", resume=False)
    assert fresh.objective.freeze_steps == 0  # the recipe's 10000 would keep random weights all run
    assert "--init none trains the fresh encoder" in capsys.readouterr().out
    asked = finetune_config("ctc", [*base, "objective.freeze_steps=7"], "none", resume=False)
    assert asked.objective.freeze_steps == 7
    _, step = save_tiny_run(
        tmp_path / "pre", "hubert", "x.jsonl"
    )  # a pretrained encoder: the recipe's freeze
    pretrained = finetune_config("ctc", base[:2], str(step), resume=False)
    assert pretrained.objective.freeze_steps == 10000
    assert "--init none" not in capsys.readouterr().out
