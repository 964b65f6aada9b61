"""Training data read straight from an object store (moto's S3 server on loopback) through fsspec."""

from __future__ import annotations

import pytest
import torch

from gpu_trainer.data import load_dataset
from gpu_trainer.errors import TrainerError


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    # fsspec maps FSSPEC_<PROTOCOL>_<KWARG> variables onto filesystem arguments.
    monkeypatch.setenv("FSSPEC_S3_ENDPOINT_URL", s3_server.endpoint_url)
    import fsspec.config

    monkeypatch.setattr(fsspec.config, "conf", {})
    fsspec.config.set_conf_env(fsspec.config.conf)
    return s3_server


def test_s3_directory_with_train_and_val_files_matches_local(s3_env, digits_dir):
    client = s3_env.client()
    client.create_bucket(Bucket="ml-data")
    for name in ("train.parquet", "val.parquet"):
        client.upload_file(str(digits_dir / name), "ml-data", f"digits/v1/{name}")
    remote = load_dataset("s3://ml-data/digits/v1", label_column="label")
    local = load_dataset(str(digits_dir), label_column="label")
    assert remote.separate_val and remote.num_classes == 10
    assert torch.equal(remote.train.features, local.train.features)
    assert torch.equal(remote.val.labels, local.val.labels)
    with pytest.raises(TrainerError, match="does not exist"):
        load_dataset("s3://ml-data/digits/v2")
