#!/bin/sh
# Regenerates tests/testdata/goldens/trl_dpo_0_28.json and trl_dpo_1_16.json.
# Needs the git-ignored oracle venvs (see /work/shared/docs/environment.md §4):
#   .venv-trl028 (trl 0.28.0, transformers<5) and .venv-oracle (trl 1.16.0).
set -eu
cd "$(dirname "$0")/../.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv-trl028/bin/python tests/oracles/trl_dpo_goldens.py
.venv-oracle/bin/python tests/oracles/trl_dpo_goldens.py
