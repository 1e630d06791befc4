#!/usr/bin/env bash
# Wheels the GPU check needs that a bare GPU image may lack (its python has torch, transformers, peft, accelerate,
# tokenizers, fsspec, psutil, tqdm, rich but no pydantic, DeepSpeed or lm-eval), for Python 3.12 on x86-64, into
# .whl/ (git-ignored). On a machine with no network: carry .whl and run
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:.
#   python3 benchmarks/gpu_check.py --out "$OUT"
# With LM_EVAL=1 it adds lm-eval and what it needs (about 30 MB more), else the zero-shot row is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DEST=.whl
mkdir -p "$DEST"
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
ver() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
download() {
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DEST" "$@"
}
# the same versions as this venv, where they are pure Python or have cp312 wheels
download "pydantic==$(ver pydantic)" "pydantic-core==$(ver pydantic-core)" "annotated-types==$(ver annotated-types)" \
  "typing-inspection==$(ver typing-inspection)" "hjson==$(ver hjson)" "zstandard==$(ver zstandard)"
# DeepSpeed ships an sdist only: build its pure-Python wheel (ops are JIT-built where they run)
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" "deepspeed==$(ver deepspeed)"
if [ "${LM_EVAL:-0}" = 1 ]; then  # all pure Python: built or copied as py3 wheels
  download "multiprocess==$(ver multiprocess)"  # one wheel per Python version
  names="lm-eval datasets evaluate dill more-itertools pytablewriter dataproperty mbstrdecoder
         pathvalidate tabledata tcolorpy typepy chardet sqlitedict word2number rouge-score"
  specs=(); for n in $names; do specs+=("$n==$(ver "$n")"); done
  "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" "${specs[@]}"
fi
du -sh "$DEST"; ls "$DEST"
