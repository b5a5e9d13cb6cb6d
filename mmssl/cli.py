"""The ``mmssl`` command.

Each subcommand is a module of ``mmssl.commands`` named after it (``mmssl data check`` is
``mmssl/commands/data_check.py``) with ``add_arguments(parser)`` and ``run(args) -> int``,
listed once in ``SUBCOMMANDS``; only the chosen one is imported, so ``mmssl --help``
is instant. Errors a user can fix (``MmsslError``, and options argparse rejects) print one line
and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from typing import NoReturn

from mmssl import __version__
from mmssl.errors import MmsslError

# name -> (module, one-line help). Order is the order of `mmssl --help`.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("mmssl.commands.synth", "generate the built-in audio-visual and image-caption corpus"),
    "data check": ("mmssl.commands.data_check", "decode every record of a manifest and report the bad ones"),
    "data import": (
        "mmssl.commands.data_import",
        "convert fairseq / AV-HuBERT .tsv/.wrd manifests to JSON lines",
    ),
    "data prepare": (
        "mmssl.commands.data_prepare",
        "manifests from a local copy of LibriSpeech, LRS3, VoxCeleb2, SpokenCOCO, Flickr8k Audio or MUSAN",
    ),
    "data lips": ("mmssl.commands.data_lips", "crop 88x88 mouth regions from face video"),
    "data pack": ("mmssl.commands.data_pack", "decode audio and lip video once into memory-mapped shards"),
    "kmeans": ("mmssl.commands.kmeans", "fit k-means on MFCC or a checkpoint's layer and write labels"),
    "pretrain": ("mmssl.commands.pretrain", "pretrain a speech or audio-visual model from a recipe"),
    "finetune-asr": ("mmssl.commands.finetune_asr", "fine-tune a pretrained encoder for ASR with CTC"),
    "lm": ("mmssl.commands.lm", "a word n-gram language model (ARPA) of a manifest's transcripts"),
    "eval-noisy": ("mmssl.commands.eval_noisy", "WER over noise types x SNRs, audio / video / audio-visual"),
    "index": ("mmssl.commands.index", "embed images into a retrieval index"),
    "retrieve": ("mmssl.commands.retrieve", "query an index with speech"),
    "serve": ("mmssl.commands.serve", "search an index over HTTP: an API and a web page"),
    "extract": ("mmssl.commands.extract", "extract features from a checkpoint"),
    "awe": (
        "mmssl.commands.awe",
        "acoustic word embeddings of a run's layers and MFCC, scored by same-different average precision",
    ),
    "layers": (
        "mmssl.commands.layers",
        "layer-wise CCA similarity of a run's encoder to its inputs or to another run",
    ),
    "probe": (
        "mmssl.commands.probe",
        "a frozen run's weighted layers probed for phones (CTC, PER) or speakers (accuracy)",
    ),
    "convert": (
        "mmssl.commands.convert",
        "a Hugging Face folder or fairseq .pt checkpoint -> an mmssl run folder",
    ),
    "export": ("mmssl.commands.export", "a run's speech encoder -> a Hugging Face model folder"),
    "demo": ("mmssl.commands.demo", "run the main job end to end on the built-in corpus"),
}


def _available() -> dict[str, tuple[str, str]]:
    found = {}
    for name, (module, text) in SUBCOMMANDS.items():
        try:
            if importlib.util.find_spec(module) is not None:
                found[name] = (module, text)
        except ModuleNotFoundError:
            continue
    return found


class _Parser(argparse.ArgumentParser):
    """An option argparse rejects (``--k abc``) is one line, like every other error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _usage(commands: dict[str, tuple[str, str]]) -> str:
    width = max((len(n) for n in commands), default=0)
    lines = ["usage: mmssl COMMAND [options]   (mmssl COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in commands.items()]
    return "\n".join(lines)


def user_message(err: BaseException) -> str:
    """The error's own message. An error raised in a DataLoader worker reaches the main process
    as the same class with the worker's whole traceback as its text; keep only its last line."""
    text = str(err)
    if "Original Traceback" not in text:
        return text
    last = text.rstrip().splitlines()[-1]
    prefix = f"{type(err).__module__}.{type(err).__qualname__}: "
    return last[len(prefix) :] if last.startswith(prefix) else last


# name -> environment a command sets (unless the user did) before its module loads PyTorch.
# kmeans: faiss and PyTorch each bring an OpenMP runtime; threads of one spinning while the other
# works made Lloyd iterations 2-8x slower on a busy 2-core machine (BENCHMARKS.md, "k-means")
# (index and serve search with faiss beside PyTorch too)
ENVIRONMENT: dict[str, dict[str, str]] = {
    name: {"OMP_WAIT_POLICY": "PASSIVE"} for name in ("kmeans", "index", "serve")
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = _available()
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage(commands))
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"mmssl {__version__}")
        return 0
    two = " ".join(argv[:2])
    name = two if two in commands else argv[0]
    if name not in commands:
        print(f"mmssl: unknown command {' '.join(argv[:2])!r}\n\n{_usage(commands)}", file=sys.stderr)
        return 2
    rest = argv[len(name.split()) :]
    module_name, text = commands[name]
    for key, value in ENVIRONMENT.get(name, {}).items():
        os.environ.setdefault(key, value)
    module = importlib.import_module(module_name)
    parser = _Parser(prog=f"mmssl {name}", description=text)
    module.add_arguments(parser)
    try:  # options may sit between positional arguments: `pretrain hubert --resume key=value`
        args = parser.parse_intermixed_args(rest)
    except SystemExit as done:  # --help, or an option argparse rejects (one line, exit 2)
        return done.code if isinstance(done.code, int) else 2
    try:
        return int(module.run(args) or 0)
    except MmsslError as err:
        print(f"mmssl {name}: error: {user_message(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mmssl {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
