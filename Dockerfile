# syntax=docker/dockerfile:1
# Elemta container image: docker build -t elemta .
# Two stages on Debian 12 (the release the packages and tests target): the builder makes
# a virtualenv, the runtime copies only that venv, so no compiler or pip cache ships.
# Runs as the unprivileged user elemta on port 2525 (publish it as 25); see
# deploy/docker/elemta.yaml for why no root is needed in a container.

FROM python:3.11-slim-bookworm AS builder
# Compilers only for a dependency without a wheel for this platform (lmdb, gevent on
# arm); versions come from the Debian release the base image pins.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY setup.cfg setup.py README.rst ./
COPY elemta ./elemta
# constraints/tested.txt pins the versions the test suite passed with (the same file
# the .deb and .rpm bundle), so the image runs what was tested.
COPY constraints ./constraints
RUN python -m venv /opt/elemta \
    && /opt/elemta/bin/pip install --no-cache-dir -c constraints/tested.txt .

FROM python:3.11-slim-bookworm
LABEL org.opencontainers.image.title="Elemta" \
      org.opencontainers.image.description="Mail transfer agent" \
      org.opencontainers.image.licenses="MIT"
# A fixed uid/gid, so volumes and Kubernetes runAsUser/fsGroup can name it.
RUN groupadd --system --gid 10025 elemta \
    && useradd --system --uid 10025 --gid elemta --home-dir /var/spool/elemta \
       --no-create-home --shell /usr/sbin/nologin elemta \
    && install -d -o elemta -g elemta -m 0750 /var/spool/elemta
COPY --from=builder /opt/elemta /opt/elemta
COPY deploy/docker/elemta.yaml /etc/elemta/elemta.yaml
COPY deploy/docker/entrypoint.sh /usr/local/bin/elemta-entrypoint
ENV PATH=/opt/elemta/bin:$PATH \
    ELEMTA_CONFIG=/etc/elemta/elemta.yaml \
    PYTHONUNBUFFERED=1
# The queue (message files and index.lmdb) must outlive the container.
VOLUME ["/var/spool/elemta"]
USER 10025:10025
EXPOSE 2525 8025
# /api/v1/health needs no token; python is in the image, curl is not.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8025/api/v1/health', timeout=4)"]
# SIGTERM (docker stop) drains: sessions get master.stop_grace (20 s in the image's
# config) to finish; docker stop's default 10 s is too short, so use --time 30 or the
# compose file's stop_grace_period.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/elemta-entrypoint"]
