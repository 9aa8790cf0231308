# Image for llava-c-ray clusters (Ray launcher, KubeRay). Build and push:
#   docker build -t llava-c-ray:0.1.0 .                              (add --build-arg FLASH_ATTN=1 for flash-attn)
#   docker tag llava-c-ray:0.1.0 <registry>/llava-c-ray:0.1.0 && docker push <registry>/llava-c-ray:0.1.0
# The base image's Ray version must equal the one pinned in pyproject.toml (tests/test_dockerfile.py checks it).
FROM rayproject/ray:2.60.0-py311-cu128

ARG FLASH_ATTN=0

USER root
RUN apt-get update \
    && apt-get install -y --no-install-recommends git \
    && rm -rf /var/lib/apt/lists/*

# The official Ray image already has the non-root user "ray" (uid 1000); the project runs as that user.
USER ray
WORKDIR /home/ray/llava-c-ray
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users llava_c_ray ./llava_c_ray
COPY --chown=ray:users jobs ./jobs
# With the `eval` extra (lmms-eval, `--model llava_c`: docs/lmms-eval.md), resolved together with the
# project so torch and the extra's torchvision==0.28.0 come as the pair it is built for (torch 2.13.0).
RUN pip install --no-cache-dir ".[eval]" \
    && if [ "$FLASH_ATTN" = "1" ]; then pip install --no-cache-dir flash-attn --no-build-isolation; fi

ENV HF_HUB_OFFLINE=0 \
    TOKENIZERS_PARALLELISM=false
