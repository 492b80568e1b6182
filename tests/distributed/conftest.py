"""One two-process DDP run of the demo config on the tiny model, shared by the distributed tests."""

import os
from types import SimpleNamespace

import pytest

from tests.distributed.launch import PER_DEVICE, overrides, torchrun


@pytest.fixture(scope="session")
def ddp(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("ddp")
    dump = tmp / "dump"
    dump.mkdir()
    env = {**os.environ, "CHATTUNE_CACHE": str(tmp / "cache"), "CHATTUNE_TEST_DUMP": str(dump)}
    out = tmp / "runs" / "ddp"
    proc = torchrun(2, ["train", "configs/demo.yaml", *overrides(tiny_model_dir, out, PER_DEVICE)], env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return SimpleNamespace(tmp=tmp, run=out, dump=dump, log=proc.stderr, env=env)
