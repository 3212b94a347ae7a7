"""`--ray-address`: replicas on a Ray cluster that was started apart from effinfer (its own module: no other Ray
cluster of the tests runs meanwhile, since `ray stop` ends every Ray process of the machine)."""

from __future__ import annotations

import asyncio
import os

from effinfer import SamplingParams
from effinfer.config import EngineConfig
from effinfer.serving.replicas import ReplicaSet
from tests.tiny_models import save_tiny_folder


def test_replicas_on_an_existing_cluster_by_address(tmp_path, monkeypatch):
    """`--ray-address`: a cluster started apart (here `ray start --head`, as an operator would, with Ray's token
    authentication on) takes the replicas; leaving it disconnects and leaves the cluster running."""
    import re
    import subprocess
    import sys

    from tests.helpers import free_port

    folder = tmp_path / "tiny"
    folder.mkdir()
    save_tiny_folder("qwen2", folder)
    ray_cli = [sys.executable, "-m", "ray.scripts.scripts"]
    env = {**os.environ, "RAY_ADDRESS": ""}
    started = subprocess.run([*ray_cli, "start", "--head", f"--port={free_port()}", "--num-cpus=2",
                              "--include-dashboard=false"], check=True, capture_output=True, text=True, timeout=120,
                             env=env)
    address = re.search(r"ray start --address='([^']+)'", started.stdout + started.stderr).group(1)
    monkeypatch.setenv("RAY_AUTH_MODE", "token")      # the cluster's token is in ~/.ray, where `ray start` put it
    try:
        config = EngineConfig.from_kwargs(model=str(folder), dtype="float32", num_blocks=32, max_model_len=128,
                                          compile=False, show_progress=False)
        replica_set = ReplicaSet(config, 1, ray_address=address)
        replica_set.start()
        try:
            tokens = asyncio.run(first_tokens(replica_set))
        finally:
            replica_set.stop()
        assert len(tokens) == 6
        status = subprocess.run([*ray_cli, "status", f"--address={address}"], capture_output=True, text=True,
                                timeout=60, env={**env, "RAY_AUTH_MODE": "token"})
        assert status.returncode == 0          # still up: only the replicas went
    finally:
        subprocess.run([*ray_cli, "stop", "--force"], capture_output=True, timeout=120, env=env)


async def first_tokens(replica_set) -> list[int]:
    await replica_set.start_async()
    tokens = []
    async for _, output in replica_set.generate([5, 6, 7, 8], [SamplingParams(max_tokens=6, ignore_eos=True)], "remote"):
        tokens.extend(output.new_token_ids)
    return tokens
