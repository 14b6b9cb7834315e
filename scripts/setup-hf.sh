#!/usr/bin/env bash
# Install PyTorch, Hugging Face transformers, PEFT and TRL (CPU use) into a private virtual
# environment: for the test that loads an exported student in transformers, the test that
# trains a TRL step on `kdpipe export-data`'s files, and for the
# training benchmark's anchor (the newest versions on PyPI when this was written). Prints
# the venv's python. PyPI's torch wheel brings its CUDA libraries (about 5 GB) even for CPU
# use; the venv is kept in KDPIPE_HF_VENV (default ~/.cache/kdpipe/hf-venv), so only the
# first run downloads them.
set -euo pipefail
venv="${KDPIPE_HF_VENV:-$HOME/.cache/kdpipe/hf-venv}"
py="$venv/bin/python"
want_torch=2.15.0
want_tf=5.24.0
want_peft=0.21.2
want_trl=1.16.0
if [ -x "$py" ] && "$py" -c "import torch, transformers, peft, trl; assert torch.__version__.startswith('$want_torch') and transformers.__version__ == '$want_tf' and peft.__version__ == '$want_peft' and trl.__version__ == '$want_trl'" 2>/dev/null; then
  echo "$py"
  exit 0
fi
echo "setup-hf: installing torch $want_torch, transformers $want_tf, peft $want_peft and trl $want_trl (about 5 GB, once)" >&2
python3 -m venv "$venv"
"$py" -m pip install --quiet "torch==$want_torch" "transformers==$want_tf" "peft==$want_peft" "trl==$want_trl" >&2
echo "$py"
