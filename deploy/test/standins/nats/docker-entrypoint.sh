#!/bin/sh
# As the official image: a first argument that is a flag runs nats-server with the flags.
set -e
if [ "${1#-}" != "$1" ]; then
    set -- nats-server "$@"
fi
exec "$@"
