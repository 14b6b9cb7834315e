#!/usr/bin/env bash
# Install Hugging Face transformers with PyTorch (CPU use) into a private virtual
# environment, for the test that loads an exported student in transformers. Prints the
# venv's python. PyPI's torch wheel brings its CUDA libraries (about 5 GB) even for CPU
# use; the venv is kept in KDPIPE_HF_VENV (default ~/.cache/kdpipe/hf-venv), so only the
# first run downloads them.
set -euo pipefail
venv="${KDPIPE_HF_VENV:-$HOME/.cache/kdpipe/hf-venv}"
py="$venv/bin/python"
want_torch=2.9.1
want_tf=4.57.3
if [ -x "$py" ] && "$py" -c "import torch, transformers; assert torch.__version__.startswith('$want_torch') and transformers.__version__ == '$want_tf'" 2>/dev/null; then
  echo "$py"
  exit 0
fi
echo "setup-hf: installing torch $want_torch and transformers $want_tf (about 5 GB, once)" >&2
python3 -m venv "$venv"
"$py" -m pip install --quiet "torch==$want_torch" "transformers==$want_tf" >&2
echo "$py"
