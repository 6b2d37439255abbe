#!/bin/sh
# Runs one Procfile role by name, with the Procfile's command:
#   docker run IMAGE web | celery | celery2 | beat | rq | llm | tickets | migrate
# or any other command (docker run IMAGE python manage.py shell). Extra arguments after a role are
# appended to its command (docker run IMAGE celery -Q llm.heavy overrides the queues: celery takes
# the last -Q). The Helm chart sets command/args itself and does not go through this script.
set -eu

# Each process takes its database connections from a pool of this size (Procfile figures); the
# chart sets DATABASE_POOL_* per component.
pool() {
    : "${DATABASE_POOL_MAX_SIZE:=$1}"
    export DATABASE_POOL_MAX_SIZE
}

role="${1:-web}"
[ "$#" -gt 0 ] && shift

case "$role" in
    web)
        pool 16
        # 0.0.0.0 in the container; trust X-Forwarded-* only from FORWARDED_ALLOW_IPS.
        exec uvicorn config.asgi:application --host 0.0.0.0 --port "${PORT:-8000}" \
            --workers "${WEB_WORKERS:-2}" --loop uvloop --http httptools --ws websockets --no-access-log \
            --proxy-headers --forwarded-allow-ips "${FORWARDED_ALLOW_IPS:-127.0.0.1}" "$@"
        ;;
    celery | celery2)
        pool 16
        : "${DATABASE_POOL_TIMEOUT_SECONDS:=30}"
        export DATABASE_POOL_TIMEOUT_SECONDS
        name=llm-a
        [ "$role" = celery2 ] && name=llm-b
        exec celery -A config worker -n "${CELERY_WORKER_NAME:-$name}@%h" \
            -Q "${CELERY_QUEUES:-llm.light,llm.standard,llm.heavy,default}" \
            --pool threads --concurrency "${CELERY_CONCURRENCY:-64}" --loglevel "${CELERY_LOG_LEVEL:-INFO}" "$@"
        ;;
    beat)
        pool 2
        : "${DATABASE_POOL_TIMEOUT_SECONDS:=30}"
        export DATABASE_POOL_TIMEOUT_SECONDS
        exec celery -A config beat --scheduler tenant_schemas_celery.scheduler:TenantAwareScheduler \
            --schedule "${PORTAL_VAR_DIR:-/app/var}/celerybeat-schedule" --loglevel "${CELERY_LOG_LEVEL:-INFO}" "$@"
        ;;
    rq)
        pool 4
        : "${DATABASE_POOL_TIMEOUT_SECONDS:=30}"
        export DATABASE_POOL_TIMEOUT_SECONDS
        [ "$#" -eq 0 ] && set -- ingest default
        exec python manage.py rqworker "$@"
        ;;
    llm)
        pool 1
        exec python manage.py llm_serve "$@"
        ;;
    tickets)
        pool 1
        exec python manage.py tickets_serve "$@"
        ;;
    migrate)
        # One connection per migrating process, no pool (as the chart's migration Job).
        : "${DATABASE_POOL:=false}"
        export DATABASE_POOL
        exec python manage.py migrate_schemas --noinput --executor="${MIGRATE_EXECUTOR:-multiprocessing}" "$@"
        ;;
    *)
        exec "$role" "$@"
        ;;
esac
