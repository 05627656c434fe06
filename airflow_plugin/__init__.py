"""podbroker for Apache Airflow 3: DAG authors name secrets, workers never see values.

    from airflow_plugin.operator import BrokerPodOperator
    from airflow_plugin.secrets import env_secret, file_secret

    BrokerPodOperator(
        task_id="load_warehouse",
        image="ghcr.io/example/etl:1.4",
        secrets=[
            env_secret("warehouse-loader", prefix="WH_"),          # WH_PASSWORD, ...
            file_secret("tableau-token", mount_path="/var/run/secrets/tableau"),
        ],
        deferrable=True,
    )

Modules: ``hook`` (the ``podbroker`` connection and HTTP clients), ``operator``,
``trigger`` (async status polling), ``plugin`` (the "Secret usage" UI page),
``provider`` (connection type metadata), ``example_dags``. This package never imports
hvac, kubernetes or the broker's adapters (import-linter contract)."""
