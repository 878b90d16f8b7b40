# The runtime image of ../../Dockerfile, made from binaries cargo already
# built on the host instead of building them in a rust stage: no image
# registry needed beyond the debian:bookworm-slim base (scripts/compose-test.sh
# imports one made with debootstrap). Build context: a directory holding
# bin/widgetry, bin/widgetry-agent, broker.toml and
# deploy/docker/healthcheck.sh (scripts/compose-test.sh stages it).
FROM debian:bookworm-slim
COPY bin/ /usr/local/bin/
# ---- runtime layout: identical in Dockerfile and deploy/docker/prebuilt.Dockerfile (scripts/compose-test.sh checks) ----
COPY broker.toml /etc/widgetry/broker.toml
COPY deploy/docker/healthcheck.sh /usr/local/bin/widgetry-healthcheck
RUN useradd --system --uid 10001 --user-group --home-dir /data --no-create-home widgetry \
 && mkdir -p /data \
 && chown widgetry:widgetry /data
ENV WIDGETRY_BROKER_CONFIG=/etc/widgetry/broker.toml
WORKDIR /data
VOLUME /data
USER widgetry
EXPOSE 1883 1884 8080
# serve and web answer GET /healthz; docker-compose.yml disables the check
# for the roles without HTTP (agents, loadgen, ingest).
HEALTHCHECK --interval=3s --timeout=5s --retries=3 CMD ["widgetry-healthcheck"]
CMD ["widgetry", "serve"]
# ---- end of runtime layout ----
