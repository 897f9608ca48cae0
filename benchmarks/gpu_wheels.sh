#!/usr/bin/env bash
# Fetch, on this machine, the wheels benchmarks/gpu.py needs on the device machine and that its image lacks
# (diffusers, bitsandbytes, importlib_metadata; peft pinned to the version the engine is tested with) into .whl/,
# which git ignores locally. Then: run(command="bash benchmarks/gpu_run.sh", carry=[".whl"], timeout_s=600).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> "$(git rev-parse --git-path info/exclude)"
rm -rf .whl && mkdir .whl
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d .whl diffusers==0.42.1 bitsandbytes==0.50.2 peft==0.21.2 importlib_metadata==8.7.0
du -sh .whl
