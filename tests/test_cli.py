import subprocess
import sys

from mmssl import cli


def test_help_lists_available_commands(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name, (module, _) in cli._available().items():
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
