#!/usr/bin/env bash
# Fetch (on the development machine, which reaches PyPI) the wheels the GPU checks need on a device machine that
# reaches nothing: Python 3.12, x86-64, torch/accelerate/safetensors/tokenizers/timm already there. Pure-Python
# packages that PyPI ships only as sources (deepspeed, hjson's deps) are built here into py3-none wheels.
# Versions are the ones the CPU test suite runs with. Writes .whl/ (git-ignored); scripts/gpu/run_checks.sh installs
# them with --target. Usage: bash scripts/gpu/fetch_wheels.sh   (then carry ".whl" in the device call)
set -euo pipefail
cd "$(dirname "$0")/../.."
dest=.whl
rm -rf "$dest" && mkdir -p "$dest"
binary() {  # binary wheels for CPython 3.12 on manylinux x86-64
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$dest" "$@"
}
# diffusion: diffusers; CLIP scorer: open_clip (+ftfy, wcwidth); VLM: our transformers/peft versions, num2words
binary diffusers==0.42.1 transformers==5.24.0 peft==0.21.2 open-clip-torch ftfy wcwidth num2words importlib-metadata==8.7.0 zipp
# DeepSpeed ZeRO: deepspeed and what it imports (deepspeed and num2words's docopt are built here: pure Python)
binary hjson pydantic==2.14.4 pydantic-core==2.50.5 annotated-types typing-inspection typing-extensions
python3 -m pip wheel -q --no-deps -w "$dest" deepspeed==0.19.8 docopt  # sources only on PyPI
ls -l "$dest"
du -sh "$dest"
