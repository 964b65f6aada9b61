from __future__ import annotations
import requests
def test_servers(mlflow_server, mlflow_auth_server, airflow_db):
    assert requests.get(mlflow_server.uri + "/health").status_code == 200
    r = requests.get(mlflow_auth_server.uri + "/api/2.0/mlflow/experiments/search?max_results=1", auth=("alice", "wrong"))
    print(r.status_code, r.text[:200])
    r = requests.get(mlflow_auth_server.uri + "/api/2.0/mlflow/experiments/search?max_results=1", auth=("alice", "alice-Pa55word-123"))
    print(r.status_code, r.text[:200])
