import subprocess
import sys

from mmssl import cli


def test_help_lists_available_commands(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in cli._available():
        assert name in out
    # every listed command's module exists and exposes the two entry points
    import importlib

    for module, _ in cli._available().values():
        mod = importlib.import_module(module)
        assert callable(mod.add_arguments) and callable(mod.run), module


def test_unknown_command_exits_2(capsys):
    assert cli.main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "mmssl.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "usage: mmssl" in out.stdout


def test_errors_from_data_workers_print_only_their_message(tmp_path, capsys):
    import json

    from torch.utils.data import DataLoader

    from mmssl.data.collate import collate
    from mmssl.data.datasets import ManifestDataset

    manifest = tmp_path / "m.jsonl"
    manifest.write_text(
        "".join(json.dumps({"id": f"r{i}", "audio": f"missing{i}.wav"}) + "\n" for i in range(4))
    )
    loader = DataLoader(
        ManifestDataset(str(manifest), max_bad_fraction=0.0, min_seen=1),
        batch_size=2,
        num_workers=1,
        collate_fn=collate,
    )
    try:
        next(iter(loader))
    except Exception as err:  # the worker's DataError, re-raised with its traceback as text
        assert "Original Traceback" in str(err)
        message = cli.user_message(err)
    assert "Traceback" not in message and "missing0.wav" in message and "max_bad_fraction" in message


def test_options_may_sit_between_positional_arguments(monkeypatch):
    """`mmssl pretrain hubert --resume key=value` parses as `pretrain hubert key=value --resume`."""
    import mmssl.commands.pretrain as pretrain_cli

    seen = {}
    monkeypatch.setattr(pretrain_cli, "run", lambda args: seen.update(vars(args)) or 0)
    assert cli.main(["pretrain", "hubert", "--resume", "train.max_steps=2", "data.train=x.jsonl"]) == 0
    assert seen["resume"] is True
    assert seen["recipe"] == "hubert" and seen["overrides"] == ["train.max_steps=2", "data.train=x.jsonl"]
