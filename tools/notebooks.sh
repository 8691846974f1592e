#!/usr/bin/env bash
# The notebooks in experiments/notebooks: render each jupytext percent-format .py file to a
# paired .ipynb (edits saved in Jupyter go back to the .py), then start JupyterLab on them.
#
#   bash tools/notebooks.sh                  # render, then JupyterLab on 127.0.0.1:8888
#   bash tools/notebooks.sh --port 9999      # another port; other arguments go to jupyter lab
#   bash tools/notebooks.sh --render-only    # only (re)write the .ipynb files
#   bash tools/notebooks.sh --execute        # run every notebook headless on the tiny
#                                            # preset, keep its outputs in the .ipynb and its
#                                            # figures in $MIMO_JAX_NOTEBOOK_FIGURES
#                                            # (default build/notebook-figures)
# On a TPU VM, forward the port from your machine and open the URL Jupyter prints:
#   gcloud compute tpus tpu-vm ssh NAME --zone ZONE -- -L 8888:localhost:8888
source "$(dirname "$0")/env.sh" notebooks,eval  # no bare `source`: it would pass our arguments
port=8888
mode=lab
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --port) port="$2"; shift 2 ;;
    --port=*) port="${1#--port=}"; shift ;;
    --render-only) mode=render; shift ;;
    --execute) mode=execute; shift ;;
    *) args+=("$1"); shift ;;
  esac
done
cd experiments/notebooks
notebooks=([0-9][0-9]_*.py)
# --sync writes the .ipynb from the .py (or the .py from the .ipynb when that was saved last)
# and keeps the outputs already in the .ipynb.
for nb in "${notebooks[@]}"; do
  jupytext --sync --quiet "$nb"
done
echo "rendered ${#notebooks[@]} notebooks in $(pwd)"
case "$mode" in
  render) exit 0 ;;
  execute)
    export MPLBACKEND=Agg
    export MIMO_JAX_NOTEBOOK_FIGURES="${MIMO_JAX_NOTEBOOK_FIGURES:-$ROOT/build/notebook-figures}"
    for nb in "${notebooks[@]}"; do
      echo "executing $nb"
      jupytext --execute --quiet --to ipynb "$nb"
    done
    echo "outputs in experiments/notebooks/*.ipynb, figures in $MIMO_JAX_NOTEBOOK_FIGURES"
    exit 0 ;;
esac
[ "$(id -u)" = 0 ] && args+=(--allow-root)  # containers; Jupyter refuses root otherwise
# 127.0.0.1 only: reach it through an SSH tunnel (see above), never an open port.
exec jupyter lab --no-browser --ip 127.0.0.1 --port "$port" "${args[@]}"
