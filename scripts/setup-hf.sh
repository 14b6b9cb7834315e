#!/usr/bin/env bash
# Install PyTorch, Hugging Face transformers and PEFT (CPU use) into a private virtual
# environment: for the test that loads an exported student in transformers, and for the
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
if [ -x "$py" ] && "$py" -c "import torch, transformers, peft; assert torch.__version__.startswith('$want_torch') and transformers.__version__ == '$want_tf' and peft.__version__ == '$want_peft'" 2>/dev/null; then
  echo "$py"
  exit 0
fi
echo "setup-hf: installing torch $want_torch, transformers $want_tf and peft $want_peft (about 5 GB, once)" >&2
python3 -m venv "$venv"
"$py" -m pip install --quiet "torch==$want_torch" "transformers==$want_tf" "peft==$want_peft" >&2
echo "$py"
