#!/usr/bin/env bash
# Prepare what bench/gpu_run.sh needs on the GPU machine, which has no network: run it HERE.
#
#   bash bench/prepare_gpu_carry.sh [DIR]        # DIR defaults to .gpu in the repo root (git-excluded)
#
# DIR then holds, and the `run` call carries it (carry: [".gpu"]; with the repo, under 64 MiB):
#   comfyui.tar.xz  the ComfyUI tree (COMFY_SRC, default ../shared/comfyui) without its tests, .git and CI
#                   files, xz-packed (3 MB instead of 15: the wheels need the room); gpu_run.sh unpacks it
#   wheels/         cp312 manylinux x86_64 wheels of exactly the packages the GPU machine lacks (see
#                   /work/.library/device/KINDS.md), pinned to requirements-test.txt where it pins them
#   stubs/          comfyui_frontend_package: an empty web root (ComfyUI's server exits without one; the
#                   real package is 11 MB of UI the tests never load)
#   manifest.txt    "import-name  path  why" per line: gpu_run.sh installs an entry only when that import fails
# Left out on purpose (ComfyUI starts and runs prompts without them; checked with the imports blocked):
# comfyui-workflow-templates (84 MB) and -embedded-docs (optional routes), alembic/SQLAlchemy (the
# database is optional; the tests use none), kornia and spandrel (three comfy_extras nodes fail to import:
# canny, morphology, upscale models; none is used here).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
DIR=${1:-$REPO/.gpu}
COMFY_SRC=${COMFY_SRC:-$REPO/../shared/comfyui}
MAX_MIB=56
PY=${PYTHON:-python3}

[ -f "$COMFY_SRC/main.py" ] || { echo "no ComfyUI tree at $COMFY_SRC (set COMFY_SRC)" >&2; exit 1; }
mkdir -p "$DIR" && DIR=$(cd "$DIR" && pwd)
case $DIR in /|"$REPO"|"$HOME") echo "refusing to empty $DIR" >&2; exit 1 ;; esac
# Never commit it: DIR inside the repo goes into .git/info/exclude.
if [[ $DIR == "$REPO"/* ]]; then
  exclude=$(git -C "$REPO" rev-parse --git-path info/exclude); [[ $exclude == /* ]] || exclude=$REPO/$exclude
  mkdir -p "$(dirname "$exclude")"; grep -qxF "/${DIR#"$REPO"/}/" "$exclude" 2>/dev/null || echo "/${DIR#"$REPO"/}/" >>"$exclude"
fi
rm -rf "$DIR" && mkdir -p "$DIR/wheels" "$DIR/stubs/comfyui_frontend_package/static"

echo "== ComfyUI $(sed -n 's/.*"\(.*\)".*/\1/p' "$COMFY_SRC/comfyui_version.py") from $COMFY_SRC"
tar -C "$(dirname "$COMFY_SRC")" --owner=0 --group=0 --mode=u+w \
    --exclude=.git --exclude=.github --exclude=.ci --exclude=__pycache__ --exclude='*.pyc' \
    --exclude="$(basename "$COMFY_SRC")/tests" --exclude="$(basename "$COMFY_SRC")/tests-unit" \
    --exclude="$(basename "$COMFY_SRC")/temp" --transform="s,^$(basename "$COMFY_SRC"),comfyui," \
    -cJf "$DIR/comfyui.tar.xz" "$(basename "$COMFY_SRC")"

# requirements-test.txt's pin of a package, else the given one (the version CI here has).
pin() { local v; v=$(sed -n "s/^$1==\([^ ;#]*\).*/\1/p" "$REPO/requirements-test.txt"); echo "$1==${v:-$2}"; }
# import-name  requirement  why (one per wheel; --no-deps, so every missing dependency is listed)
WHEELS=(
  "av               $(pin av 18.1.0)                comfy_api imports it (nodes, execution, server); LoadAudio decodes with it"
  "torchsde         $(pin torchsde 0.2.6)           comfy.k_diffusion.sampling imports it (nodes, execution)"
  "trampoline       $(pin trampoline 0.1.2)         torchsde"
  "pydantic         $(pin pydantic 2.13.4)          server.py (comfy_api) imports it"
  "pydantic_core    $(pin pydantic-core 2.46.4)     pydantic"
  "annotated_types  $(pin annotated-types 0.7.0)    pydantic"
  "typing_inspection $(pin typing-inspection 0.4.2) pydantic"
  "pydantic_settings $(pin pydantic-settings 2.14.1) ComfyUI reads custom-node pyproject.toml with it"
  "dotenv           $(pin python-dotenv 1.2.2)      pydantic-settings"
  "diffusers        $(pin diffusers 0.42.1)         the bridge trainer and bench/bridge_training.py"
  "soundfile        $(pin soundfile 0.14.0)         the trainer's sound data and its tests"
  "cffi             $(pin cffi 2.0.0)               soundfile"
  "pycparser        $(pin pycparser 3.0)            cffi"
  "py3langid        $(pin py3langid 0.4.0)          the pack: GlueNet Router language detection"
  "trimesh          $(pin trimesh 5.2.0)            the pack: X2I Load Point Cloud (meshes)"
)
echo "== wheels"
reqs=(); for w in "${WHEELS[@]}"; do read -r _ req _ <<<"$w"; reqs+=("$req"); done
"$PY" -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp --no-deps \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    -d "$DIR/wheels" "${reqs[@]}" 2>"$DIR/pip.log" || { cat "$DIR/pip.log" >&2; exit 1; }
rm "$DIR/pip.log"

{
  echo "# import-name  path-in-carry  why   (written by bench/prepare_gpu_carry.sh; read by bench/gpu_run.sh)"
  for w in "${WHEELS[@]}"; do
    read -r mod req why <<<"$w"
    name=${req%%==*}; file=$(cd "$DIR/wheels" && ls | grep -i "^${name//-/_}-${req#*==}-" | head -1)
    [ -n "$file" ] || { echo "no wheel for $req" >&2; exit 1; }
    echo "$mod wheels/$file $why"
  done
  echo "comfyui_frontend_package stubs/comfyui_frontend_package an empty web root: main.py exits without the frontend package"
} >"$DIR/manifest.txt"
[ "$(ls "$DIR/wheels" | wc -l)" -eq "${#WHEELS[@]}" ] || { echo "expected ${#WHEELS[@]} wheels, got:" >&2; ls "$DIR/wheels" >&2; exit 1; }

cat >"$DIR/stubs/comfyui_frontend_package/__init__.py" <<'EOF'
"""Stand-in for comfyui-frontend-package on the GPU test machine: ComfyUI's server needs a web root
(importlib.resources.files(comfyui_frontend_package) / "static") and exits without one. No UI is served."""
EOF
echo '<!doctype html><title>ComfyUI test server (no frontend)</title>' >"$DIR/stubs/comfyui_frontend_package/static/index.html"

cat "$DIR/manifest.txt"
size=$(du -sb "$DIR" | cut -f1)
tracked=$(git -C "$REPO" ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
awk -v d="$DIR" -v s="$size" -v t="$tracked" -v m="$MAX_MIB" \
  'BEGIN { printf "== %s: %.1f MiB (limit %d MiB); the repo travels too: %.1f MiB tracked\n", d, s/1048576, m, t/1048576 }'
[ "$size" -le $((MAX_MIB * 1048576)) ] || { echo "too big for the carry" >&2; exit 1; }
