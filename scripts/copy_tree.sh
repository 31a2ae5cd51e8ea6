#!/usr/bin/env bash
# copy_tree.sh DEST: this checkout's source tree into DEST (which must exist), without .git,
# virtual environments or build outputs. In a git checkout: tracked and untracked files that
# .gitignore does not exclude; elsewhere (a copied tree without .git), everything but those.
set -euo pipefail
DEST=$1
cd "$(dirname "$0")/.."
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    # (a venv inside the tree is left out even where .gitignore does not name it)
    git ls-files -z -c -o --exclude-standard --exclude='.venv*/' --exclude='venv/' | tar --null -T - -cf -
else
    tar -cf - --exclude=./.git --exclude='./.venv*' --exclude=./venv --exclude=./.whl --exclude=./build \
        --exclude='*.so' --exclude=./gpu_results .
fi | tar -xf - -C "$DEST"
