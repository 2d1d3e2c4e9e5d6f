FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY schemas schemas
COPY broker broker
COPY gateway gateway
COPY dispatcher dispatcher
COPY worker worker
COPY examples examples
COPY store store
COPY recorder recorder
COPY observe observe
RUN pip install --no-cache-dir .
ENV PYTHONUNBUFFERED=1
