# dali-skd on CUDA 13: `docker build -t dali-skd .` then `docker run --gpus all -v $PWD/runs:/work/runs dali-skd dali-skd demo`
# Layers from rarely to often changing: system, PyTorch, the other dependencies, then the project's source.
FROM nvidia/cuda:13.0.0-base-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

# PyTorch's CUDA 13 build (cuDNN and the CUDA libraries come as wheels; the driver comes from the host)
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu130

# the project's other dependencies, from pyproject.toml alone so that source edits keep this layer cached
COPY pyproject.toml /src/
RUN python3 -c "import tomllib; d = tomllib.load(open('/src/pyproject.toml', 'rb')); \
print('\n'.join(x for x in d['project']['dependencies'] if not x.startswith('torch')))" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt

COPY README.md cli.py /src/
COPY dali_skd /src/dali_skd
COPY preprocess /src/preprocess
RUN pip install --no-deps /src

WORKDIR /work
CMD ["dali-skd", "--help"]
