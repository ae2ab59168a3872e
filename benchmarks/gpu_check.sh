#!/usr/bin/env bash
# The prepared check of every GPU path, for a lent GPU machine (benchmarks/README.md has the results):
#   bash benchmarks/gpu_check.sh OUT_DIR            # on the GPU machine: ~8 minutes on one H100
#   bash benchmarks/gpu_check.sh OUT_DIR --smoke    # the same steps on this CPU with tiny sizes (~2-3 min)
# Writes OUT_DIR/gpu_check.json, gpu_check.md and gpu_check.log, also when a step fails.
#
# The GPU machine has torch, timm, transformers, onnx(runtime), pandas, ... but no network: what geoloc
# needs beyond that travels as wheels in .whl/ (`make gpu-wheels` downloads them here). geoloc itself is
# installed from this tree with --no-deps, so the machine's own CUDA build of torch is never replaced.
set -uo pipefail
out=${1:?usage: benchmarks/gpu_check.sh OUT_DIR [--smoke] [--budget S] [--demo-size N]}
shift
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
site=$(mktemp -d /tmp/geoloc-site.XXXXXX)
had_build=$([ -e build ] && echo 1 || echo 0)
trap 'rm -rf "$site"; [ "$had_build" = 1 ] || rm -rf build' EXIT
case " $* " in *" --smoke "*) smoke=1 ;; *) smoke=0 ;; esac
if [ "$smoke" = 0 ] && compgen -G ".whl/*.whl" >/dev/null; then  # (they are for the GPU machine's Python 3.12)
  $py -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl || exit 1
fi
if $py -m pip install -q --no-index --no-deps --no-build-isolation --target "$site" .; then
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
else  # no setuptools in this Python (3.12+ venvs): the tree itself, importable as it is
  echo "gpu_check: could not build geoloc here; using the source tree" >&2
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
# offline: random weights everywhere, no hub look-ups that would wait for time-outs
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
"$py" -c "import geoloc_cli, sys; print('geoloc from', geoloc_cli.__file__, 'python', sys.version.split()[0])"
"$py" benchmarks/gpu_check.py "$out" "$@"
