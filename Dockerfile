# One image for every Widgetry role and the agent.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release -p widgetry-server \
 && cargo build --profile agent -p widgetry-agent

FROM debian:bookworm-slim
COPY --from=build /src/target/release/widgetry /usr/local/bin/widgetry
COPY --from=build /src/target/agent/widgetry-agent /usr/local/bin/widgetry-agent
COPY broker.toml /etc/widgetry/broker.toml
ENV WIDGETRY_BROKER_CONFIG=/etc/widgetry/broker.toml
WORKDIR /data
EXPOSE 1883 8080
CMD ["widgetry", "serve"]
