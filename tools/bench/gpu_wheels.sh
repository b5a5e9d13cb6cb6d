#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with the wheels that tools/bench/gpu_session.sh installs offline on
# the lent GPU machine: the dependencies of mmssl that its image lacks, and their own missing
# dependencies, for its Python (CPython 3.12, x86-64 manylinux). Versions are the ones of this
# checkout's .venv, so both machines run the same code. Run it here, in the repository root:
#
#     bash tools/bench/gpu_wheels.sh                    # -> .whl/*.whl (~50 MiB), then a summary
#     bash tools/bench/gpu_wheels.sh --with-matplotlib  # also matplotlib (+9 MiB)
#
# The image already has torch 2.11, torchaudio, torchvision, opencv, sentencepiece, numpy, scipy,
# scikit-image, tensorboard, safetensors, tqdm, regex, timm, huggingface-hub, PyYAML, click and
# (as read on 2026-11-17) matplotlib. What it lacks: av (PyAV, bundles FFmpeg),
# open_clip_torch -> ftfy -> wcwidth, omegaconf (2.4 needs only PyYAML), jiwer -> rapidfuzz and
# espeakng-loader. The GPU session needs no matplotlib (plots are not part of it): carry it only
# for an image without it. The wheels and the working tree travel together, 64 MiB at most.
set -euo pipefail

PYTHON=${PYTHON:-.venv/bin/python}
DEST=${DEST:-.whl}
PY_VERSION=3.12
MISSING=(av open_clip_torch ftfy wcwidth omegaconf jiwer rapidfuzz espeakng-loader)
case "${1:-}" in
    "") ;;
    --with-matplotlib) MISSING+=(matplotlib) ;;
    *) echo "usage: bash tools/bench/gpu_wheels.sh [--with-matplotlib]" >&2; exit 2 ;;
esac

pins=()
for name in "${MISSING[@]}"; do
    version=$("$PYTHON" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")
    pins+=("$name==$version")
done

mkdir -p "$DEST"
rm -f "$DEST"/*.whl  # one version of each: two would stop the offline install
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
           manylinux2014_x86_64 manylinux1_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64 \
           manylinux_2_35_x86_64; do
    platforms+=(--platform "$tag")
done
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PY_VERSION" \
    --implementation cp "${platforms[@]}" -d "$DEST" "${pins[@]}"

# every requirement of a downloaded wheel must be on the image or among the wheels
"$PYTHON" - "$DEST" <<'EOF'
import re
import sys
import zipfile
from pathlib import Path

ON_IMAGE = {"torch", "torchvision", "regex", "tqdm", "huggingface-hub", "safetensors", "timm", "pyyaml",
            "click", "contourpy", "cycler", "fonttools", "kiwisolver", "numpy", "packaging", "pillow",
            "pyparsing", "python-dateutil"}
wheels = sorted(Path(sys.argv[1]).glob("*.whl"))
have = {re.sub(r"[-_.]+", "-", w.name.split("-")[0]).lower() for w in wheels}
missing = []
for wheel in wheels:
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        for line in z.read(meta).decode().splitlines():
            if line.startswith("Requires-Dist:") and "extra ==" not in line:
                need = re.split(r"[ ;<>=!~\[(]", line.split(":", 1)[1].strip())[0]
                need = re.sub(r"[-_.]+", "-", need).lower()
                if need not in have and need not in ON_IMAGE:
                    missing.append(f"{wheel.name} needs {need}")
total = sum(w.stat().st_size for w in wheels) / 2**20
print(f"{len(wheels)} wheels, {total:.1f} MiB in {sys.argv[1]}")
for w in wheels:
    print(f"  {w.name}")
if missing:
    sys.exit("not on the image and not downloaded:\n  " + "\n  ".join(missing))
EOF
