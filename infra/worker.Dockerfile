# A Prefect worker that runs mergeflow's flows. CPU torch by default; for GPU workers build
# FROM an nvidia/cuda runtime image and install the matching CUDA torch wheel first.
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends git && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/mergeflow
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
 && pip install --no-cache-dir -e '.[s3]'
COPY flows ./flows
COPY stages ./stages
COPY dvc.yaml params.yaml ./
