"""Two processes share one Redis store: blocks saved by one are restored by the other."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from conftest import make_tiny_model
from helpers import random_ids

from hf_kvcache.prefix import PrefixCache, RedisBackend, generate_with_prefix_cache

GREEDY = {"max_new_tokens": 5, "do_sample": False}
TESTS = Path(__file__).resolve().parents[1]

WORKER = """
import json, sys, torch
from conftest import make_tiny_model
from hf_kvcache.prefix import PrefixCache, RedisBackend, generate_with_prefix_cache
model = make_tiny_model("llama")
store = PrefixCache(RedisBackend(sys.argv[1], prefix="shared:"), block_size=8)
outputs = [generate_with_prefix_cache(model, torch.tensor([ids]), store, **json.loads(sys.argv[3]))[0].tolist()
           for ids in json.loads(sys.argv[2])]
print(json.dumps({"outputs": outputs, "stats": store.stats()}))
"""


def run_worker(url: str, prompts: list[torch.Tensor]) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    args = [url, json.dumps([p[0].tolist() for p in prompts]), json.dumps(GREEDY)]
    done = subprocess.run([sys.executable, "-c", WORKER, *args], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_two_processes_share_one_redis_store(redis_server):
    model = make_tiny_model("llama")
    store = PrefixCache(RedisBackend(redis_server.url, prefix="shared:"), block_size=8)
    prefix = random_ids(model, 1, 32, seed=1)
    first, second = (torch.cat([prefix, random_ids(model, 1, 12, seed=s)], dim=1) for s in (2, 3))
    generate_with_prefix_cache(model, first, store, **GREEDY)  # this process saves 5 blocks

    worker = run_worker(redis_server.url, [first, second])
    assert worker["outputs"] == [
        model.generate(first, **GREEDY)[0].tolist(),
        model.generate(second, **GREEDY)[0].tolist(),
    ]
    assert worker["stats"]["hits"] == 5 + 4 and worker["stats"]["blocks_saved"] == 1  # second's 5th block is new

    assert torch.equal(generate_with_prefix_cache(model, second, store, **GREEDY), model.generate(second, **GREEDY))
    assert store.stats()["hits"] == 5  # including the block the other process saved
