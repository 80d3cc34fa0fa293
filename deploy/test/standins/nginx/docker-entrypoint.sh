#!/bin/sh
# As the official image: for `nginx ...`, source /docker-entrypoint.d/*.envsh and run
# the executable *.sh there in order, then exec the command.
set -e
if [ "$1" = "nginx" ] || [ "$1" = "nginx-debug" ]; then
    for f in $(find /docker-entrypoint.d/ -follow -type f -print | sort -V); do
        case "$f" in
            *.envsh) [ -x "$f" ] && . "$f" ;;
            *.sh) [ -x "$f" ] && "$f" ;;
        esac
    done
fi
exec "$@"
