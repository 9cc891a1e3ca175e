"""Where plugin results go besides SQL: MLflow, and (in the service) webhooks."""
