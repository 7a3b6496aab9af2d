# One image: the operator (`kopf run /opt/orchestrator/operator/handlers.py`) and the runner of
# adapter/gate pods (`python -m core.runner adapter|gate`), plus the `orchestrator` CLI.
#
# BASE_IMAGE must provide python3 (>= 3.11) with the venv module and pip. The default is the
# official Python slim image; the local test cluster (hack/cluster/images) builds its own
# Debian base with debootstrap and passes it here, because no registry is reachable:
#   buildah bud --build-arg BASE_IMAGE=localhost/orchestrator/debian-base:<tag> .
#   docker build -t orchestrator:dev .
# Both stages use the same base, so the venv's interpreter symlink resolves in the final one.
ARG BASE_IMAGE=python:3.11-slim

# ---- build: install the project and its dependencies into a venv -------------
FROM ${BASE_IMAGE} AS build
# Optional, build-time only (not kept in the image): a CA bundle for a TLS-intercepting
# egress proxy (hack/cluster/images mounts the host's bundle and sets this), an index.
ARG PIP_CERT=""
ARG PIP_INDEX_URL=""
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/orchestrator/bin:$PATH
RUN [ -n "$PIP_CERT" ] || unset PIP_CERT; [ -n "$PIP_INDEX_URL" ] || unset PIP_INDEX_URL; \
    python3 -m venv /opt/orchestrator && pip install "setuptools>=69" wheel
WORKDIR /src
# Dependencies first (with the `postgres` extra: the chart's production database), in a layer
# of their own that only pyproject.toml invalidates (the package itself is a stub here and is
# uninstalled again); source edits then rebuild in seconds with a layer cache.
COPY pyproject.toml /src/
RUN [ -n "$PIP_CERT" ] || unset PIP_CERT; [ -n "$PIP_INDEX_URL" ] || unset PIP_INDEX_URL; \
    mkdir -p core && echo '__version__ = "0"' > core/__init__.py && touch README.md \
 && pip install --no-build-isolation --no-compile ".[postgres]" \
 && pip uninstall -y "$(python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["name"])')" \
 && { rm -rf /src/* /src/.[!.]* 2>/dev/null || true; }
COPY pyproject.toml README.md /src/
COPY core /src/core
# Then: drop the build-only packages from the venv (pip stays, so images built FROM this one
# can add an AI CLI with `pip install`), and precompile bytecode: pods run with a read-only
# root filesystem, so nothing could cache it at run time and every start would recompile.
RUN pip install --no-deps --no-build-isolation --no-compile . \
 && pip uninstall -y setuptools wheel \
 && python3 -m compileall -q -j 0 /opt/orchestrator/lib \
 && python3 -c "import core, core.runner, kopf, kubernetes, psycopg"

# ---- runtime -------------------------------------------------------------------
FROM ${BASE_IMAGE}
ARG VERSION=""
ARG REVISION=""
ARG CREATED=""
LABEL org.opencontainers.image.title="orchestrator" \
      org.opencontainers.image.description="Kubernetes-native execution controller for AI coding tasks: operator and runner" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}"
# git: the runner checks out repositories and computes diffs. Installed only when the base
# lacks it (the local Debian base has it; python:3.11-slim does not). No compiler or other
# build tool is installed in this stage.
RUN if ! command -v git >/dev/null 2>&1; then \
      apt-get update && apt-get install -y --no-install-recommends git ca-certificates \
      && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb; \
    fi \
 && (getent group orchestrator >/dev/null || groupadd --gid 10001 orchestrator) \
 && (id -u orchestrator >/dev/null 2>&1 || useradd --uid 10001 --gid 10001 --create-home \
      --home-dir /home/orchestrator --shell /usr/sbin/nologin orchestrator) \
 && install -d -o 10001 -g 10001 -m 0750 /var/lib/orchestrator
COPY --from=build /opt/orchestrator /opt/orchestrator
# kopf loads the operator by path (`kopf run .../handlers.py`); it imports only core.*.
COPY operator/handlers.py /opt/orchestrator/operator/handlers.py
ENV PATH=/opt/orchestrator/bin:$PATH \
    PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/orchestrator
USER 10001:10001
WORKDIR /home/orchestrator
ENTRYPOINT ["orchestrator"]
CMD ["--help"]
