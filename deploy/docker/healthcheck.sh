#!/bin/bash
# The image's HEALTHCHECK: GET /healthz on the address `widgetry serve`/`web`
# listen on (WIDGETRY_HTTP_LISTEN, default 0.0.0.0:8080; a wildcard host is
# asked on 127.0.0.1). Uses bash's /dev/tcp, so the image needs no curl.
# Exits 0 only on an HTTP 200 answer.
set -euo pipefail
listen=${WIDGETRY_HTTP_LISTEN:-0.0.0.0:8080}
port=${listen##*:}
host=${listen%:*}
case "$host" in 0.0.0.0 | "" | "[::]") host=127.0.0.1 ;; esac
host=${host#[}
host=${host%]}
exec 3<>"/dev/tcp/$host/$port"
printf 'GET /healthz HTTP/1.0\r\nHost: %s\r\n\r\n' "$host" >&3
read -r -t 5 status_line <&3
case "$status_line" in
  "HTTP/1."?" 200"*) exit 0 ;;
  *) echo "GET http://$host:$port/healthz: ${status_line:-no answer}" >&2; exit 1 ;;
esac
