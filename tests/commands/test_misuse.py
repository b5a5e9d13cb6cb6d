"""Every subcommand, misused: a wrong-typed value and a file that is not UTF-8 where it reads
text are each one line on stderr, exit 2, no traceback (issue 16).

The walk is driven by ``cli.SUBCOMMANDS``: every typed option of every command's parser is given
``abc``, and each command must have an entry in ``WRONG_VALUES`` and in ``NOT_UTF8`` (or say why
it reads no text file), so a new command cannot escape it. Commands run in-process through
``cli.main``; each case fails before any model is built or media decoded.
"""

from __future__ import annotations

import argparse
import importlib
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from mmssl import cli

LATIN1 = "caf\xe9 na\xefve\n".encode("latin-1")  # é and ï: not UTF-8


def _typed_options(name: str) -> list[str]:
    """The options of ``mmssl NAME`` whose values argparse converts (int, float...)."""
    parser = argparse.ArgumentParser()
    importlib.import_module(cli.SUBCOMMANDS[name][0]).add_arguments(parser)
    return [
        action.option_strings[-1]
        for action in parser._actions
        if action.option_strings and action.type not in (None, str, Path) and action.nargs != 0
    ]


def _one_line_error(argv: list[str], capsys, *named: str) -> str:
    code = cli.main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, f"{argv}: exit {code}\n{err}"
    assert len(lines) == 1 and "Traceback" not in err, f"{argv}:\n{err}"
    for text in named:
        assert text in lines[0], f"{argv}: {text!r} not in {lines[0]!r}"
    return lines[0]


def _manifest(path: Path, records: int = 1) -> Path:
    path.write_text("".join(json.dumps({"id": f"r{i}", "audio": f"r{i}.wav"}) + "\n" for i in range(records)))
    return path


def _latin1_manifest(tmp: Path) -> Path:
    path = _manifest(tmp / "latin1.jsonl", 2)
    path.write_bytes(path.read_bytes() + b'{"id": "r9", "transcript": "' + LATIN1.strip() + b'"}\n')
    return path  # the bad byte is on line 3


def _run(tmp: Path, latest: bytes = b"step_00000001\n", config: str = "objective:\n  name: ctc\n") -> Path:
    """A run folder as far as the commands read it before building anything."""
    run = tmp / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(config)
    (run / "checkpoints" / "latest").write_bytes(latest)
    return run


# ------------------------------------------------------------------ wrong-typed values

# name -> command lines with a wrong value that argparse's types do not catch (config keys,
# values the command parses, choices), and a text the one-line error must contain; a command
# with no typed option needs at least one
_PROBE = ["probe", "--task", "phones", "--manifest", "m", "--valid", "v", "--checkpoint"]

WRONG_VALUES: dict[str, list[tuple[Callable[[Path], list[str]], str]]] = {
    "synth": [(lambda t: ["synth", "--size", "huge"], "--size")],
    "data check": [
        (lambda t: ["data", "check", str(_manifest(t / "m.jsonl")), "--workers", "2.5"], "--workers")
    ],
    "data import": [
        (lambda t: _write(t / "x.tsv", "/root\na.wav\tabc\n") + ["--out", str(t / "o.jsonl")], "x.tsv:2"),
    ],
    "data lips": [(lambda t: ["data", "lips", str(t), "--out", str(t / "o"), "--size", "big"], "--size")],
    "data pack": [
        (lambda t: ["data", "pack", str(_manifest(t / "m.jsonl")), "--out", str(t), "--shard", "a/b"], "a/b")
    ],
    "kmeans": [
        (
            lambda t: ["kmeans", "--manifest", "m.jsonl", "--features", "mfcc", "--k", "2.5", "--out", "o"],
            "--k",
        )
    ],
    "pretrain": [
        (lambda t: ["pretrain", "wav2vec2", "data.train=m.jsonl", "train.max_steps=abc"], "train.max_steps"),
        (lambda t: ["pretrain", "wav2vec2", "data.train=m.jsonl", "train.lr=fast"], "train.lr"),
        (
            lambda t: ["pretrain", "wav2vec2", "data.train=m.jsonl", "objective.mask_prob=abc"],
            "objective.mask_prob",
        ),
        (
            lambda t: ["pretrain", "wav2vec2", "data.train=m.jsonl", "objective.mask_prob=[0.5"],
            "objective.mask_prob",
        ),
        (lambda t: ["pretrain", "wav2vec2", "data.train=m.jsonl", "train.progress=maybe"], "train.progress"),
        (
            lambda t: ["pretrain", "wav2vec2", "data.train=m.jsonl", "data.modalities=audio"],
            "data.modalities",
        ),
        (lambda t: ["pretrain", "wav2vec2", "data.train=m.jsonl", "model.size=[1]"], "model.size"),
    ],
    "finetune-asr": [
        (
            lambda t: ["finetune-asr", "ctc", "--init", "none", "data.train=m.jsonl", "train.seed=x"],
            "train.seed",
        ),
        (
            lambda t: ["finetune-asr", "ctc", "--init", "none", "data.train=m.jsonl", "data.num_workers=2.5"],
            "num_workers",
        ),
        (
            lambda t: ["finetune-asr", "ctc", "--init", "none", "--decoder", "greedy", "--lm", "x.arpa"],
            "--lm",
        ),
    ],
    "eval-noisy": [
        (lambda t: ["eval-noisy", "--run", str(t), "--manifest", "m.jsonl", "--snrs", "loud"], "loud"),
        (
            lambda t: ["eval-noisy", "--run", str(t), "--manifest", "m.jsonl", "--decoder", "best"],
            "--decoder",
        ),
        (lambda t: ["eval-noisy", "--run", str(t), "--manifest", "m.jsonl", "--lm", "x.arpa"], "--lm"),
    ],
    "lm": [
        (lambda t: ["lm", "--manifest", str(_transcripts(t)), "--order", "0", "--out", "o"], "--order"),
    ],
    "index": [
        (lambda t: ["index", "--run", str(t), "--manifest", "m.jsonl", "--out", "o", "--ks", "a,b"], "--ks")
    ],
    "retrieve": [(lambda t: ["retrieve", "--index", str(t), "--text", "a", "--top", "many"], "--top")],
    "serve": [
        (lambda t: ["serve", "--index", str(t), "--port", "70000"], "--port"),
        (lambda t: ["serve", "--index", str(t), "--max-upload-mb", "-1"], "--max-upload-mb"),
    ],
    "extract": [
        (lambda t: ["extract", "--checkpoint", str(t), "--manifest", "m", "--out", "o", "--layer", "x"], "x")
    ],
    "awe": [
        (lambda t: ["awe", "--manifest", "m.jsonl", "--pool", "max"], "--pool"),
        (lambda t: ["awe", "--manifest", "m.jsonl", "--frames", "0"], "--frames"),
    ],
    "layers": [
        (
            lambda t: ["layers", "--checkpoint", str(t), "--manifest", "m", "--out", "o", "--method", "x"],
            "--method",
        )
    ],
    "probe": [
        (lambda t: [*_PROBE, str(t), "--steps", "0"], "--steps"),
        (lambda t: [*_PROBE, str(t), "--task", "words"], "--task"),
    ],
    "demo": [(lambda t: ["demo", "--out", str(t), "--model-size", "huge"], "--model-size")],
    "convert": [
        (lambda t: ["convert", str(t), "--out", str(t / "o"), "--kind", "onnx"], "--kind"),
        (
            lambda t: [
                "convert",
                str(_hf_config(t, hidden_size="abc")),
                "--out",
                str(t / "o"),
            ],
            "hidden_size",
        ),
    ],
    "export": [(lambda t: ["export", str(t), "--to", "onnx", "--out", "o"], "--to")],
}


def _hf_config(folder: Path, **values) -> Path:
    """A Hugging Face folder whose config.json has ``values`` (read before any weights)."""
    config = {"model_type": "wav2vec2", "feat_extract_norm": "group", "conv_dim": [2], "conv_kernel": [2]}
    (folder / "config.json").write_text(json.dumps({**config, "conv_stride": [1], **values}))
    return folder


def _transcripts(t: Path) -> Path:
    path = t / "m.jsonl"
    path.write_text(json.dumps({"id": "r0", "audio": "r0.wav", "transcript": "a cat"}) + "\n")
    return path


def _write(path: Path, text: str) -> list[str]:
    path.write_text(text)
    return ["data", "import", str(path)]


@pytest.mark.parametrize("name", list(cli.SUBCOMMANDS))
def test_every_command_refuses_a_wrong_typed_value_in_one_line(name, tmp_path, monkeypatch, capsys):
    options, cases = _typed_options(name), WRONG_VALUES.get(name, [])
    assert options or cases, f"`mmssl {name}` has no typed option: add a wrong-value case to WRONG_VALUES"
    monkeypatch.chdir(tmp_path)
    for option in options:
        _one_line_error([*name.split(), option, "abc"], capsys, option, "abc")
    for i, (argv, named) in enumerate(cases):
        folder = tmp_path / str(i)
        folder.mkdir()
        _one_line_error(argv(folder), capsys, named)


# ------------------------------------------------------------------ text that is not UTF-8


def _prepare_librispeech(t: Path) -> tuple[list[str], Path]:
    chapter = t / "LibriSpeech" / "dev-clean" / "1" / "2"
    chapter.mkdir(parents=True)
    (chapter / "1-2-0000.flac").write_bytes(b"")
    bad = chapter / "1-2.trans.txt"
    bad.write_bytes(b"1-2-0000 " + LATIN1)
    return ["data", "prepare", "librispeech", "--root", str(t / "LibriSpeech"), "--out", str(t / "o")], bad


def _retrieve_index(t: Path) -> tuple[list[str], Path]:
    (t / "index").mkdir()
    bad = t / "index" / "index.json"
    bad.write_bytes(b'{"run": "' + LATIN1.strip() + b'"}')
    return ["retrieve", "--index", str(t / "index"), "--text", "a dog"], bad


def _serve_index(t: Path) -> tuple[list[str], Path]:
    argv, bad = _retrieve_index(t)
    return ["serve", "--index", argv[2], "--port", "0"], bad


def _demo_state(t: Path) -> tuple[list[str], Path]:
    bad = t / "seconds.json"
    bad.write_bytes(b'{"' + LATIN1.strip() + b'": 1}')
    return ["demo", "--out", str(t), "--size", "tiny", "--device", "cpu"], bad


def _latest(
    argv: Callable[[Path], list[str]], objective: str = "ctc"
) -> Callable[[Path], tuple[list[str], Path]]:
    """A command line given a run (of ``objective``) whose ``checkpoints/latest`` is not UTF-8."""

    def make(t: Path) -> tuple[list[str], Path]:
        run = _run(t, latest=LATIN1, config=f"objective:\n  name: {objective}\n")
        return argv(run), run / "checkpoints" / "latest"

    return make


def _manifest_of(argv: Callable[[Path], list[str]]) -> Callable[[Path], tuple[list[str], Path]]:
    """A command line given a Latin-1 manifest (``argv(manifest)``)."""

    def make(t: Path) -> tuple[list[str], Path]:
        bad = _latin1_manifest(t)
        return argv(bad), bad

    return make


def _bytes_file(name: str, data: bytes, argv: Callable[[Path, Path], list[str]]):
    def make(t: Path) -> tuple[list[str], Path]:
        bad = t / name
        bad.write_bytes(data)
        return argv(bad, t), bad

    return make


# name -> ways to give the command a text file that is not UTF-8 (the error names it); a
# string says why the command reads no text file
NOT_UTF8: dict[str, list[Callable[[Path], tuple[list[str], Path]]] | str] = {
    "synth": "writes a corpus, reads no text file",
    "data check": [_manifest_of(lambda m: ["data", "check", str(m), "--no-progress"])],
    "data import": [
        _bytes_file(
            "bin.tsv",
            b"/root\n\x00\xff\xfe\x80\tbinary\n",
            lambda b, t: ["data", "import", str(b), "--out", "o"],
        ),
        _bytes_file(
            "latin1.wrd",
            b"hello\n" + LATIN1,
            lambda b, t: [
                "data",
                "import",
                *_write(t / "ok.tsv", "/root\na.wav\t16000\nb.wav\t16000\n")[2:],
                "--wrd",
                str(b),
                "--out",
                "o",
            ],
        ),
    ],
    "data prepare": [_prepare_librispeech],
    "data lips": [_manifest_of(lambda m: ["data", "lips", str(m), "--out", str(m.parent / "o")])],
    "data pack": [
        _manifest_of(lambda m: ["data", "pack", str(m), "--out", str(m.parent / "o"), "--no-progress"])
    ],
    "kmeans": [
        _manifest_of(
            lambda m: ["kmeans", "--manifest", str(m), "--features", "mfcc", "--k", "2", "--out", "o"]
        ),
        _latest(
            lambda r: [
                "kmeans",
                "--manifest",
                str(_manifest(r.parent / "m.jsonl")),
                "--checkpoint",
                str(r),
                "--layer",
                "1",
                "--k",
                "2",
                "--out",
                "o",
                "--device",
                "cpu",
            ]
        ),
    ],
    "pretrain": [
        _bytes_file(
            "latin1.yaml", b"# " + LATIN1 + b"objective:\n  name: apc\n", lambda b, t: ["pretrain", str(b)]
        ),
        _manifest_of(
            lambda m: [
                "pretrain",
                "apc",
                f"data.train={m}",
                f"train.out_dir={m.parent / 'r'}",
                "data.num_workers=0",
                "train.progress=false",
            ]
        ),
    ],
    "finetune-asr": [_latest(lambda r: ["finetune-asr", "ctc", "--init", str(r), "data.train=m.jsonl"])],
    "lm": [_manifest_of(lambda m: ["lm", "--manifest", str(m), "--out", str(m.parent / "o")])],
    "eval-noisy": [
        _latest(
            lambda r: [
                "eval-noisy",
                "--run",
                str(r),
                "--manifest",
                str(_manifest(r.parent / "m.jsonl")),
                "--snrs",
                "clean",
                "--device",
                "cpu",
            ]
        )
    ],
    "index": [
        _latest(
            lambda r: [
                "index",
                "--run",
                str(r),
                "--manifest",
                str(_manifest(r.parent / "m.jsonl")),
                "--out",
                "o",
                "--device",
                "cpu",
                "--quiet",
            ],
            "speech_image",
        )
    ],
    "retrieve": [_retrieve_index],
    "serve": [_serve_index],
    "extract": [
        _manifest_of(
            lambda m: ["extract", "--checkpoint", "r", "--manifest", str(m), "--layer", "1", "--out", "o"]
        )
    ],
    "awe": [
        _manifest_of(lambda m: ["awe", "--manifest", str(m), "--out", "o"]),
        _bytes_file(
            "segments.txt",
            LATIN1,
            lambda b, t: [
                "awe",
                "--manifest",
                str(_manifest(t / "m.jsonl")),
                "--segments",
                str(b),
                "--out",
                "o",
            ],
        ),
    ],
    "layers": [_manifest_of(lambda m: ["layers", "--checkpoint", "r", "--manifest", str(m), "--out", "o"])],
    "probe": [
        _manifest_of(
            lambda m: [
                "probe",
                "--task",
                "phones",
                "--checkpoint",
                "r",
                "--manifest",
                str(m),
                "--holdout",
                "0.5",
            ]
        )
    ],
    "demo": [_demo_state],
    "convert": [
        _bytes_file(
            "config.json",
            b'{"model_type": "' + LATIN1.strip() + b'"}',
            lambda b, t: ["convert", str(t), "--out", str(t / "o")],
        )
    ],
    "export": [_latest(lambda r: ["export", str(r), "--out", "o"], "hubert")],
}


@pytest.mark.parametrize("name", list(cli.SUBCOMMANDS))
def test_every_command_names_a_file_that_is_not_utf8_in_one_line(name, tmp_path, monkeypatch, capsys):
    assert name in NOT_UTF8, f"add a non-UTF-8 case for `mmssl {name}` to NOT_UTF8 (or why it reads none)"
    cases = NOT_UTF8[name]
    if isinstance(cases, str):
        return
    monkeypatch.chdir(tmp_path)
    for i, make in enumerate(cases):
        folder = tmp_path / str(i)
        folder.mkdir()
        argv, bad = make(folder)
        line = _one_line_error(argv, capsys, str(bad), "not UTF-8")
        assert not (folder / "o").exists(), line  # no output folder left behind


# ------------------------------------------------------------------ YAML that does not parse


def test_a_recipe_or_a_runs_config_that_is_not_yaml_is_one_line_naming_file_and_line(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("objective:\n  name: apc\n  mask_prob: [0.5\ntrain:\n  lr: 1\n")
    _one_line_error(["pretrain", str(recipe), "data.train=m.jsonl"], capsys, str(recipe), "line ")
    run = _run(tmp_path, config="objective: {name: ctc\n")
    (tmp_path / "m.jsonl").write_text('{"id": "a", "audio": "a.wav"}\n')
    for argv in (
        ["extract", "--checkpoint", str(run), "--manifest", "m.jsonl", "--layer", "1", "--out", "o"],
        ["pretrain", "apc", "data.train=m.jsonl", f"train.out_dir={run}", "--resume"],
    ):
        _one_line_error(argv, capsys, str(run / "config.yaml"), "not valid YAML")
