#!/bin/sh
# Makes the virtualenv the Python plugin runs from, and generates the echo.v1 stubs into it
# from proto/echo/v1/echo.proto (grpcio-tools: no system protoc).
#
#   examples/python-plugin/setup.sh [VENV]      (default: examples/python-plugin/.venv)
#
# then run VENV/bin/python examples/python-plugin/plugin.py under mesh up (see mesh.toml here).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
venv=${1:-$here/.venv}
python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$here/requirements.txt"
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
"$venv/bin/python" -m grpc_tools.protoc -I "$here/../../proto" \
    --python_out="$site" --grpc_python_out="$site" echo/v1/echo.proto
echo "setup.sh: $venv is ready (grpcio $("$venv/bin/python" -c 'import grpc; print(grpc.__version__)'))"
