#!/bin/sh
# Container entry point (deploy/Dockerfile). For `secant serve --ray-address ADDR` it first
# joins this container to the Ray cluster as a zero-resource node: a Ray driver (the gateway)
# needs a raylet on its own node, and this one never runs tasks (--num-cpus=0 --num-gpus=0).
# Ray's token auth comes from the environment (RAY_AUTH_MODE=token plus RAY_AUTH_TOKEN or
# RAY_AUTH_TOKEN_PATH, e.g. a mounted secret). Everything else is exec'd unchanged.
set -eu

if [ "${1:-}" = "secant" ] && [ "${2:-}" = "serve" ] && [ "${SECANT_SKIP_RAYLET:-0}" != "1" ]; then
    ray_address=""
    previous=""
    for arg in "$@"; do
        case "$arg" in
            --ray-address=*) ray_address="${arg#--ray-address=}" ;;
        esac
        if [ "$previous" = "--ray-address" ]; then
            ray_address="$arg"
        fi
        previous="$arg"
    done
    if [ -n "$ray_address" ]; then
        echo "secant-entrypoint: joining Ray at $ray_address as a zero-resource node" >&2
        attempt=0
        until ray start --address="$ray_address" --num-cpus=0 --num-gpus=0 \
                --disable-usage-stats >/dev/null; do
            attempt=$((attempt + 1))
            if [ "$attempt" -ge 30 ]; then
                echo "secant-entrypoint: could not join Ray at $ray_address" >&2
                exit 1
            fi
            sleep 2
        done
    fi
fi

exec "$@"
