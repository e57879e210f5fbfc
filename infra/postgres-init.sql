-- One Postgres, two databases: Prefect's and MLflow's metadata.
CREATE DATABASE prefect OWNER mergeflow;
CREATE DATABASE mlflow OWNER mergeflow;
