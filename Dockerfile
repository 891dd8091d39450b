# sessiond container image: `docker build -t sessiond .` then
#   docker run -p 8080:8080 -p 8443:8443 -v sessiond-data:/data sessiond
# Configuration is SESSIOND_* variables (DESIGN §9); without Redis/PostgreSQL/RabbitMQ URLs it runs on the
# embedded store in /data.

# ---- builder: resolve and install the package and its dependencies into a self-contained venv ----
FROM python:3.11-slim AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
WORKDIR /src
# Dependencies first, as wheels, so that source edits do not invalidate this layer.
COPY pyproject.toml ./
RUN python -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
        > /tmp/requirements.txt
RUN /opt/venv/bin/pip wheel --wheel-dir /wheels -r /tmp/requirements.txt \
    && /opt/venv/bin/pip install --no-index --find-links /wheels -r /tmp/requirements.txt
COPY . .
RUN /opt/venv/bin/pip install --no-deps . \
    && /opt/venv/bin/python -m compileall -q /opt/venv/lib \
    && /opt/venv/bin/sessiond --version

# ---- runtime: the venv only, run as an unprivileged user ----
FROM python:3.11-slim
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SESSIOND_HOST=0.0.0.0 \
    SESSIOND_DATA_DIR=/data
RUN groupadd --system --gid 10001 sessiond \
    && useradd --system --uid 10001 --gid sessiond --home-dir /data --no-create-home \
        --shell /usr/sbin/nologin sessiond \
    && mkdir -p /data \
    && chown sessiond:sessiond /data
COPY --from=builder /opt/venv /opt/venv
USER sessiond
WORKDIR /data
VOLUME /data
EXPOSE 8080 8443
# No curl in the slim image: probe /healthz with the standard library (urlopen raises on any non-2xx answer).
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('SESSIOND_HTTP_PORT', '8080'), timeout=3)"]
# sessiond handles SIGTERM itself: stop accepting, checkpoint every actor, close devices with 1001, exit 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["sessiond"]
CMD ["serve"]
