"""The contract between the control plane (``retrain``, in Airflow) and the stages (``embedder``).

Both sides import this package; neither copies what it says. It depends on nothing but the
standard library (boto3 only for ``s3://`` storage, imported when used).

- :mod:`retrain_contract.stages`: how a stage is run and what its exit codes mean;
- :mod:`retrain_contract.params`: every trigger Param, declared once: the DAG's Params, the stages'
  flags and the deployment's defaults are all made from it.
"""
