"""Control plane of the retraining system: torch-free, importable by Airflow (``plugins/`` is on its path)."""
