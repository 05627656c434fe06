"""The broker's adapter to Airflow's public REST API (task instance verification)."""
