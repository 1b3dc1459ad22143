# dali-skd on CUDA 13: `docker build -t dali-skd .` then `docker run --gpus all -v $PWD/runs:/work/runs dali-skd dali-skd demo`
# Layers from rarely to often changing: system, PyTorch, the other dependencies, then the project's source.
#
# Three things must agree on the CUDA major version: the base image (CUDA_IMAGE), PyTorch's build (TORCH_INDEX) and
# DALI's wheel (DALI_EXTRA, an extra of pyproject.toml); the build stops if they do not. The defaults are CUDA 13:
# nvidia/cuda 13.0.0, PyTorch's cu130 build and nvidia-dali-cuda130, for a host whose driver runs CUDA 13 (nvidia-smi
# shows the CUDA its driver runs). For a CUDA 12 driver, all three for CUDA 12, e.g.
#   docker build --build-arg CUDA_IMAGE=12.8.1 --build-arg TORCH_INDEX=cu128 --build-arg DALI_EXTRA=cuda12 -t dali-skd .
ARG CUDA_IMAGE=13.0.0
FROM nvidia/cuda:${CUDA_IMAGE}-base-ubuntu24.04
ARG TORCH_INDEX=cu130
ARG DALI_EXTRA=cuda13

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

# PyTorch's build for the image's CUDA (cuDNN and the CUDA libraries come as wheels; the driver comes from the host)
RUN pip install torch==2.13.0 --index-url "https://download.pytorch.org/whl/$TORCH_INDEX"

# the project's other dependencies and DALI's wheel for this CUDA, from pyproject.toml alone so that source edits keep
# this layer cached; then the check that the image's CUDA (CUDA_VERSION, set by the base image), PyTorch's and DALI's agree
COPY pyproject.toml /src/
RUN python3 -c "import tomllib; d = tomllib.load(open('/src/pyproject.toml', 'rb'))['project']; \
print('\n'.join(x for x in d['dependencies'] + d['optional-dependencies']['$DALI_EXTRA'] if not x.startswith('torch')))" \
    > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && cuda=${CUDA_VERSION%%.*} \
    && python3 -c "import torch; assert torch.version.cuda.split('.')[0] == '$cuda', \
f'TORCH_INDEX=$TORCH_INDEX is PyTorch for CUDA {torch.version.cuda}, the image is CUDA $CUDA_VERSION: pick its index'" \
    && { pip show "nvidia-dali-cuda${cuda}0" > /dev/null \
         || { echo "DALI_EXTRA=$DALI_EXTRA does not install nvidia-dali-cuda${cuda}0, the DALI for the image's CUDA $CUDA_VERSION" >&2; exit 1; }; }

COPY README.md cli.py /src/
COPY dali_skd /src/dali_skd
COPY preprocess /src/preprocess
RUN pip install --no-deps /src

WORKDIR /work
CMD ["dali-skd", "--help"]
