#!/bin/bash
# Runs once, when the postgres container starts on an empty data volume (docker-entrypoint-initdb.d).
# POSTGRES_DB (batchmark, the results) already exists, owned by POSTGRES_USER. This adds Airflow's metadata
# database with its own role, so Airflow's credentials cannot touch the results.
set -euo pipefail

: "${AIRFLOW_DB_PASSWORD:?AIRFLOW_DB_PASSWORD is not set}"

psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    -v airflow_password="$AIRFLOW_DB_PASSWORD" -v results_db="$POSTGRES_DB" <<'EOSQL'
CREATE ROLE airflow LOGIN PASSWORD :'airflow_password';
CREATE DATABASE airflow OWNER airflow;
REVOKE ALL ON DATABASE airflow FROM PUBLIC;
REVOKE ALL ON DATABASE :"results_db" FROM PUBLIC;
EOSQL
