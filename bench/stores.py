"""Where the events end up: a moto S3 server (started on loopback) and
counting the events stored in a local directory or a bucket."""

from __future__ import annotations

import gzip
import os
import sys
from typing import Any

from procs import Child, wait_until

from tests.support import free_port, http_status

VENV_BIN = os.path.dirname(sys.executable)
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                  "AWS_REGION": "us-east-1"}


class Moto:
    """A `moto_server` S3 endpoint on a free loopback port."""

    def __init__(self, workdir: str) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        self.child = Child("moto_server",
                           [os.path.join(VENV_BIN, "moto_server"), "-H", "127.0.0.1",
                            "-p", str(self.port)],
                           env, workdir, os.path.join(workdir, "moto.log"))
        try:
            wait_until(lambda: http_status(self.endpoint + "/moto-api/") is not None, 30,
                       "moto_server to listen", self.child)
        except BaseException:
            self.child.kill_group()
            raise
        self._client = self._make_client()

    def _make_client(self) -> Any:
        import botocore.session

        return botocore.session.get_session().create_client(
            "s3", region_name="us-east-1", endpoint_url=self.endpoint,
            aws_access_key_id="testing", aws_secret_access_key="testing")

    def create_bucket(self, name: str) -> None:
        self._client.create_bucket(Bucket=name)

    def server_env(self, bucket: str) -> dict[str, str]:
        """The environment that points estat-ingest at `bucket`."""
        return {"S3_BUCKET": bucket, "AWS_ENDPOINT_URL_S3": self.endpoint, **S3_CREDENTIALS}

    def count_events(self, bucket: str) -> tuple[int, int]:
        """(objects, JSON Lines lines) in every object of the bucket."""
        objects = lines = 0
        paginator = self._client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket):
            for item in page.get("Contents", []):
                data = self._client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
                objects += 1
                lines += count_lines(data)
        return objects, lines

    def keys(self, bucket: str) -> list[str]:
        """Every object key in the bucket."""
        paginator = self._client.get_paginator("list_objects_v2")
        return [item["Key"] for page in paginator.paginate(Bucket=bucket)
                for item in page.get("Contents", [])]

    def stop(self) -> None:
        self.child.terminate(10)


def count_lines(data: bytes) -> int:
    """JSON Lines lines in one object (gunzipped when it is gzip)."""
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    return len(data.splitlines())


def count_local_events(root: str) -> tuple[int, int]:
    """(objects, lines) in every `.jsonl.gz` under `root`."""
    objects = lines = 0
    for directory, _, names in os.walk(root):
        for name in names:
            if name.endswith(".jsonl.gz"):
                with open(os.path.join(directory, name), "rb") as handle:
                    lines += count_lines(handle.read())
                objects += 1
    return objects, lines


def list_local_objects(root: str) -> list[str]:
    """Paths (relative to `root`) of every `.jsonl.gz` under `root`."""
    return [os.path.relpath(os.path.join(directory, name), root)
            for directory, _, names in os.walk(root)
            for name in names if name.endswith(".jsonl.gz")]


def count_files(root: str) -> int:
    """Regular files under `root` (dead-letter entries left behind)."""
    return sum(len(names) for _, _, names in os.walk(root))
