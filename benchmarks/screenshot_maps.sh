#!/usr/bin/env bash
# Build the demo world (configs/demo.yaml; skipped where a trained demo model exists), write every map
# geoloc draws - partition --map (html, png), predict --map, evaluate's errors.html / errors.png - and
# screenshot the pages with headless Chromium (Debian: apt-get install -y chromium).
#
#   benchmarks/screenshot_maps.sh [OUT]        (OUT defaults to geoloc-data/maps, git-ignored)
#   GEOLOC="python -m geoloc_cli" CHROMIUM=chromium benchmarks/screenshot_maps.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-geoloc-data/maps}
GEOLOC=${GEOLOC:-"${PYTHON:-python} -m geoloc_cli"}
CHROMIUM=${CHROMIUM:-chromium}
DEMO="-c configs/demo.yaml"
ROOT=geoloc-data/demo
MODEL=$ROOT/runs/demo/model.safetensors
mkdir -p "$OUT"

if [ ! -f "$MODEL" ]; then
    $GEOLOC fetch demo $DEMO
    $GEOLOC partition --cells all $DEMO
    $GEOLOC filter $DEMO
    $GEOLOC segment $DEMO
    $GEOLOC train $DEMO
fi
$GEOLOC partition --cells all $DEMO --map "$OUT/cells.html"
$GEOLOC partition --cells all $DEMO --map "$OUT/cells.png"
$GEOLOC evaluate $DEMO --model "$MODEL" --json > "$OUT/evaluate.json"
cp "$ROOT"/runs/demo/eval/demo_val/errors.html "$ROOT"/runs/demo/eval/demo_val/errors.png "$OUT/"
# four held-out photos (the demo_val URL list points at local files)
mapfile -t PHOTOS < <(head -4 "$ROOT/meta/demo_val_urls.csv" | cut -d, -f2 | sed 's|^file://||')
$GEOLOC predict "${PHOTOS[@]}" $DEMO --model "$MODEL" --json --map "$OUT/predict.html" > "$OUT/predict.json"

shot() {  # page.html -> page.png at a width x height
    "$CHROMIUM" --headless --no-sandbox --disable-gpu --disable-background-networking --disable-component-update \
        --disable-sync --no-first-run --user-data-dir="$(mktemp -d)" --screenshot="$2" --window-size="$3" \
        "file://$(realpath "$1")" 2>/dev/null
}
shot "$OUT/predict.html" "$OUT/predict-page.png" 1400,1300
shot "$OUT/errors.html" "$OUT/errors-page.png" 1300,800
shot "$OUT/cells.html" "$OUT/cells-page.png" 1300,2400
ls -l "$OUT"
