"""Reading pickled checkpoints (fairseq ``.pt``, ``pytorch_model.bin``) without running them.

``torch.load(weights_only=True)`` unpickles tensors, containers and numbers only; mmssl extends
it with an explicit allow-list of the classes fairseq checkpoints hold besides those: the legacy
``args`` (``argparse.Namespace``) and a ``cfg`` saved as an omegaconf container (its containers,
nodes and metadata, and the built-in types omegaconf records as value types). A file that needs
any other global (a class, a function such as ``os.system`` in a crafted ``__reduce__``) is
refused before anything of it runs, with a ``UnsafeCheckpointError`` naming that global.
"""

from __future__ import annotations

import argparse
import collections
import re
import typing
from pathlib import Path
from typing import Any

import omegaconf
import omegaconf.base
import omegaconf.nodes
import torch

from mmssl.errors import DataError


class UnsafeCheckpointError(DataError):
    """A pickled checkpoint that needs a global outside the allow-list."""


_NODES = ("AnyNode", "StringNode", "IntegerNode", "FloatNode", "BooleanNode", "BytesNode", "PathNode")
ALLOWED: list[Any] = [
    argparse.Namespace,
    omegaconf.DictConfig,
    omegaconf.ListConfig,
    omegaconf.base.ContainerMetadata,
    omegaconf.base.Metadata,
    *(getattr(omegaconf.nodes, n) for n in _NODES if hasattr(omegaconf.nodes, n)),
    typing.Any,
    collections.defaultdict,  # omegaconf metadata flags
    dict,
    list,
    int,
    float,
    str,
    bool,
]
# torch words the refusal of a global in two ways (a class not allowed, a module blocked)
_GLOBAL = re.compile(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)")
_GENERIC = ("Weights only load failed", "Re-running", "(1)", "(2)", "Check the documentation", "In PyTorch")


def load_pickle(file: str | Path) -> Any:
    """The object pickled in ``file`` (a ``torch.save`` zip or legacy file), on the CPU.

    ``UnsafeCheckpointError`` naming the global when the file needs one outside ``ALLOWED``;
    ``DataError`` when the file is missing, truncated or not a torch file."""
    file = Path(file)
    if not file.is_file():
        raise DataError(f"{file}: not found")
    try:
        with torch.serialization.safe_globals(ALLOWED):
            return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError...
        match = _GLOBAL.search(str(err))
        if match:
            raise UnsafeCheckpointError(
                f"{file}: refused: unpickling it needs {match.group(1)}, which is not on mmssl's "
                "allow-list of checkpoint classes (it could run code); nothing of it was run"
            ) from None
        detail = str(err).split("WeightsUnpickler error:", 1)
        if len(detail) == 2:  # refused by the restricted unpickler for another reason
            reason = (
                " ".join(detail[1].split("Check the documentation")[0].split())
                or "an unsupported instruction"
            )
            raise UnsafeCheckpointError(f"{file}: refused by the restricted unpickler: {reason}") from None
        lines = [x.strip() for x in str(err).splitlines() if x.strip() and not x.strip().startswith(_GENERIC)]
        first = lines[0] if lines else type(err).__name__
        raise DataError(
            f"{file}: cannot read the checkpoint (truncated or not a torch file: {first})"
        ) from None
