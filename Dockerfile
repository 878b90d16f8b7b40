# One image for every Widgetry role and the agent, built from source (needs
# an image registry for node, rust and debian). The dashboard is built in a
# Node stage and embedded by build.rs (WIDGETRY_UI_DIST), so the Rust stage
# needs no Node. deploy/docker/prebuilt.Dockerfile makes the same runtime
# image from binaries cargo already built on the host (scripts/compose-test.sh).
FROM node:20-bookworm AS ui
WORKDIR /ui
COPY web-ui/package.json web-ui/package-lock.json ./
RUN npm ci --no-audit --no-fund
COPY web-ui/ ./
RUN npm run build

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
COPY --from=ui /ui/dist /ui-dist
ENV WIDGETRY_UI_DIST=/ui-dist
RUN cargo build --release --locked -p widgetry-server \
 && cargo build --profile agent --locked -p widgetry-agent --features tls \
 && mkdir /out \
 && cp target/release/widgetry target/agent/widgetry-agent /out/

FROM debian:bookworm-slim
COPY --from=build /out/ /usr/local/bin/
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
