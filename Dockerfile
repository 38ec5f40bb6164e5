# Container image for grefine-curate on a Ray cluster (`ray job submit`, a KubeRay RayJob): the head
# and every worker run this image.
#
#   docker build -t your-registry/grefine-curate:0.1.0 .
#
# The same recipe as `make install`: a virtualenv at /app/.venv holding the project and its pinned
# dependencies (torch 2.14.1 + torchvision 0.29.1 from PyPI; their Linux x86_64 wheels are the CUDA
# builds and bring the CUDA runtime libraries as nvidia-* wheels, so no CUDA base image is needed: the
# node's NVIDIA driver comes in through the NVIDIA container toolkit / device plugin). Ray (`ray start`,
# which KubeRay runs) is on PATH from the same virtualenv.
#
# Model weights are not baked in: mount a volume filled by `grefine-curate models pull sdxl --to DIR`
# and pass `--models-dir`, or let the pods download them (HF_HOME on a persistent volume), or build
# with `--build-arg PRELOAD=sdxl` to pull them into /models at build time (several GB).
FROM python:3.11-slim

RUN apt-get update \
    && apt-get install -y --no-install-recommends make \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml Makefile README.md ./
COPY src ./src
RUN make install PYTHON=python3 && rm -rf /root/.cache/pip

ENV PATH=/app/.venv/bin:$PATH \
    RAY_USAGE_STATS_ENABLED=0

ARG PRELOAD=""
RUN if [ -n "$PRELOAD" ]; then grefine-curate models pull "$PRELOAD" --to /models; fi

# No ENTRYPOINT: KubeRay starts `ray start ...` in the image; `ray job submit` runs the command given.
CMD ["grefine-curate", "--help"]
