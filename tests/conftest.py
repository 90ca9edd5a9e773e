"""Shared fixtures: ``refused`` (the CLI refuses with exit code 2 and one line) and a local S3
endpoint (moto) for tests that read or write ``s3://``."""

from __future__ import annotations

import logging
import os
import shutil
import uuid

import pytest

from zseg.cli import main


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1 with one empty bucket; yields ``"s3://<bucket>"``.

    ``AWS_ENDPOINT_URL`` and test credentials are set for the session (s3fs and boto read
    them), and restored afterwards. Give each test its own prefix inside the bucket.
    """
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    bucket = f"zseg-test-{uuid.uuid4().hex[:8]}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ENDPOINT_URL", f"http://{host}:{port}")
        mp.delenv("AWS_ENDPOINT_URL_S3", raising=False)
        mp.delenv("AWS_PROFILE", raising=False)
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.delenv("AWS_SESSION_TOKEN", raising=False)
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        s3fs.S3FileSystem(client_kwargs={"endpoint_url": f"http://{host}:{port}"}).mkdir(bucket)
        try:
            yield f"s3://{bucket}"
        finally:
            s3fs.S3FileSystem.clear_instance_cache()
            server.stop()


@pytest.fixture
def refused(capsys):
    """``refused(argv, *expect, lines=1) -> lines``: run the CLI in this process and check that it
    refuses: exit code 2, ``lines`` lines starting ``zseg: error:`` (any number with ``lines=None``),
    which together contain every string of ``expect``."""

    def check(argv, *expect: str, lines: int | None = 1) -> list[str]:
        capsys.readouterr()
        code = main(list(argv))
        err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("zseg:")]
        assert code == 2, err
        if lines is not None:
            assert len(err) == lines, err
        assert all(line.startswith("zseg: error:") for line in err), err
        text = "\n".join(err)
        for e in expect:
            assert e in text, err
        return err

    return check


@pytest.fixture(scope="session")
def nextflow() -> str:
    """The ``nextflow`` on the PATH (scripts/env.sh installs it from Maven Central); a test that
    needs it fails in CI without it and is skipped elsewhere."""
    exe = shutil.which("nextflow")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("no `nextflow` on the PATH: scripts/env.sh installs it from Maven Central (java and mvn needed)")
        pytest.skip("no `nextflow` on the PATH (scripts/env.sh installs it)")
    return exe
