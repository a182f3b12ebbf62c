"""Developer tools for local mode: the local stack (``make up``/``make down``), the demo, the compose check.

Nothing here is imported by Airflow: these tools live outside ``plugins/`` on purpose.
"""
