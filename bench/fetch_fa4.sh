#!/usr/bin/env bash
# Prepares FlashAttention-4 (flash-attn-4, the CuTe DSL kernels: SM90 forward and backward, MLA's 192/128 head dims)
# for the H200 machine (Python 3.12, CUDA 13, no network) in .fa4/ at the project root, ignored by git: .fa4/small/
# holds the small wheels (~19 MB) and install.sh, .fa4/p0 and .fa4/p1 the CuTe DSL libraries' wheel (~92 MB) cut in
# two, so that each device call carries less than 64 MiB. On the machine, two calls back to back:
#   1. carry [".whl", ".fa4/p0"]: mkdir -p /tmp/fa4 && cat .fa4/p0 > /tmp/fa4/cu13.part
#   2. carry [".fa4/small", ".fa4/p1"]: cp .fa4/small/* /tmp/fa4/ && cat .fa4/p1 >> /tmp/fa4/cu13.part && bash /tmp/fa4/install.sh
#      then PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:$PWD (pip --target does not run the .pth
#      file that puts CuTe DSL's packages on the path)
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
grep -qx '/.fa4/' .git/info/exclude 2>/dev/null || echo '/.fa4/' >> .git/info/exclude
rm -rf .fa4 && mkdir -p .fa4/small .fa4/dl
plat=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any)
python3 -m pip download -q --no-deps --only-binary=:all: "${plat[@]}" -d .fa4/small flash-attn-4==4.0.0b36 \
  nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1 apache-tvm-ffi==0.1.15.post2 torch-c-dlpack-ext==0.1.5 \
  quack-kernels==0.6.5 einops==0.8.2 nvidia-cutlass-dsl-libs-core==4.8.1 cuda-bindings==13.5.0 cuda-pathfinder==1.9.1 \
  protobuf==7.36.2
python3 -m pip download -q --no-deps --only-binary=:all: "${plat[@]}" -d .fa4/dl nvidia-cutlass-dsl-libs-cu13==4.8.1
split -b 46M -d -a 1 .fa4/dl/nvidia_cutlass_dsl_libs_cu13-4.8.1-*.whl .fa4/p
rm -rf .fa4/dl
cat > .fa4/small/install.sh <<'SH'
#!/bin/bash
# On the H200: join the CuTe DSL libraries' wheel, install FlashAttention-4 and its dependencies into /tmp/site.
set -e
cd /tmp/fa4
[ -f cu13.part ] && mv cu13.part nvidia_cutlass_dsl_libs_cu13-4.8.1-cp312-cp312-manylinux_2_28_x86_64.whl
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site *.whl
PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages python3 -c "from flash_attn.cute import flash_attn_func; print('flash_attn.cute imports')"
SH
chmod +x .fa4/small/install.sh
ls -la .fa4 .fa4/small
