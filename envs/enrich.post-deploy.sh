#!/usr/bin/env bash
# scgpt 0.2.4 is needed for its vocabulary only; its own dependencies (torchtext) do not
# install beside torch 2.13, so it goes in without them. Then the project's library.
set -euo pipefail
pip install --no-deps scgpt==0.2.4
pip install --no-deps -e .
