#!/bin/sh
# docker/pip-install.sh: the pip installs of the image build (docker/Dockerfile mounts it, the wheelhouse
# at /wheels and the CA bundle secret at /run/secrets/ca_bundle).
#
#   pip-install.sh torch SPEC        the CPU torch: from the wheelhouse when it holds a torch wheel,
#                                    else from $TORCH_INDEX_URL (never the default index's CUDA build)
#   pip-install.sh deps PYPROJECT    the [project] dependencies and the build requirements it names
#
# OFFLINE=1: pip reads the wheelhouse and nothing else. PIP_INDEX_URL / PIP_EXTRA_INDEX_URL: a mirror.
# TORCH_SLIM=0 keeps torch's C++ headers and test binaries (default 1: left out).
set -eu

what=$1
spec=$2
set -- --find-links /wheels
if [ "${OFFLINE:-0}" = 1 ]; then set -- "$@" --no-index; fi
if [ -s /run/secrets/ca_bundle ]; then
  PIP_CERT=/run/secrets/ca_bundle
  export PIP_CERT
fi

case $what in
  torch)
    if [ "${OFFLINE:-0}" = 1 ] || ls /wheels/torch-*.whl >/dev/null 2>&1; then
      for w in /wheels/torch-*.whl; do echo "pip-install.sh: $spec: the wheelhouse holds ${w#/wheels/}"; done
      pip install "$@" "$spec"
    else
      echo "pip-install.sh: $spec from ${TORCH_INDEX_URL} (no torch wheel in the wheelhouse)"
      pip install "$spec" --index-url "${TORCH_INDEX_URL}"
    fi
    if [ "${TORCH_SLIM:-1}" = 1 ]; then
      # C++ headers and test binaries: nothing in the image compiles against torch (about 200 MB less to
      # copy for every container with the vfs storage driver)
      torch_dir=$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/torch
      rm -rf "$torch_dir/test" "$torch_dir/include"
      find "$torch_dir/bin" -type f \( -name 'test_*' -o -name '*Test' \) -delete
    fi
    ;;
  deps)
    python - "$spec" >/tmp/requirements.txt <<'PY'
import sys
import tomllib

with open(sys.argv[1], "rb") as f:
    doc = tomllib.load(f)
print("\n".join(doc["project"]["dependencies"] + doc["build-system"]["requires"]))
PY
    pip install "$@" -r /tmp/requirements.txt
    rm -f /tmp/requirements.txt
    ;;
  *)
    echo "pip-install.sh: error: '$what' is not allowed: torch or deps" >&2
    exit 2
    ;;
esac
