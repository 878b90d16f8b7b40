# One image for every Widgetry role and the agent.
# The dashboard is built in a Node stage and embedded by build.rs
# (WIDGETRY_UI_DIST), so the Rust stage needs no Node.
FROM node:20-bookworm AS ui
WORKDIR /ui
COPY web-ui/package.json web-ui/package-lock.json ./
RUN npm install --no-audit --no-fund
COPY web-ui/ ./
RUN npm run build

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
COPY --from=ui /ui/dist /ui-dist
ENV WIDGETRY_UI_DIST=/ui-dist
RUN cargo build --release -p widgetry-server \
 && cargo build --profile agent -p widgetry-agent

FROM debian:bookworm-slim
COPY --from=build /src/target/release/widgetry /usr/local/bin/widgetry
COPY --from=build /src/target/agent/widgetry-agent /usr/local/bin/widgetry-agent
COPY broker.toml /etc/widgetry/broker.toml
ENV WIDGETRY_BROKER_CONFIG=/etc/widgetry/broker.toml
WORKDIR /data
EXPOSE 1883 1884 8080
CMD ["widgetry", "serve"]
