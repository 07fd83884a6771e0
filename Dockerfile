# One image for the API, the workers and beat; docker-compose.yml picks the command.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /srv/srft

RUN useradd --create-home --uid 1000 srft
COPY pyproject.toml README.md alembic.ini ./
COPY app ./app
COPY workers ./workers
COPY migrations ./migrations
# Editable, so the migrations folder next to the package is found at run time. The export
# extra (transformers, pyarrow; no torch) lets workers build tokenized exports.
RUN pip install -e '.[export]' && mkdir -p /data/exports && chown srft /data/exports

USER srft
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --retries=5 \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"
CMD ["srft", "serve", "--host", "0.0.0.0", "--port", "8000"]
