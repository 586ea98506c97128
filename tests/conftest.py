import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


SHARED_RAY_TMPDIR = "/tmp/fedtune-ray-shared"


def stop_ray_under(temp_dir: str) -> None:
    """Stop the Ray cluster whose processes name their session directory under ``temp_dir`` on
    their command lines (`ray stop` would stop every Ray on the machine)."""
    import psutil

    procs = []
    for p in psutil.process_iter(["cmdline"]):
        if any(temp_dir in arg for arg in p.info["cmdline"] or []):
            procs.append(p)
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


@pytest.fixture(scope="session")
def shared_ray() -> str:
    """One local Ray cluster (`ray start --head`, every CPU of the machine, 127.0.0.1) for the
    simulations of a test session: runs attach to it with ``simulation.ray_address`` instead of
    starting and stopping Ray each time. Yields its address; stopped at the end of the session."""
    from fedtune.deploy.processes import free_port

    port = free_port()
    bindir = os.path.dirname(sys.executable)
    env = {**os.environ, "RAY_TMPDIR": SHARED_RAY_TMPDIR, "RAY_USAGE_STATS_ENABLED": "0"}
    head = subprocess.run([f"{bindir}/ray", "start", "--head", f"--port={port}", "--include-dashboard=false",
                           f"--temp-dir={SHARED_RAY_TMPDIR}", f"--num-cpus={os.cpu_count() or 1}",
                           "--node-ip-address=127.0.0.1", "--disable-usage-stats"],
                          env=env, capture_output=True, text=True, timeout=180, check=False)
    if head.returncode != 0:
        stop_ray_under(SHARED_RAY_TMPDIR)
        pytest.fail(f"ray start --head failed:\n{head.stderr[-2000:]}")
    try:
        yield f"127.0.0.1:{port}"
    finally:
        stop_ray_under(SHARED_RAY_TMPDIR)


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


def rand_factors(gen: torch.Generator, rank: int, out_f: int = 12, in_f: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    a = torch.randn(rank, in_f, generator=gen, dtype=torch.float64)
    b = torch.randn(out_f, rank, generator=gen, dtype=torch.float64)
    return a, b


def masked_logits(base, state, rank, cfg, masks, ids):
    """Logits of ``base`` with ``state``'s adapter at ``rank`` and ``masks`` applied (no slicing):
    what an exported pruned model must reproduce."""
    from fedtune.pruning.structure import apply_masks, model_structure
    from fedtune.training.local import _prepare, _release, head_state

    own = head_state(base)
    peft_model, handles = _prepare(base, state, rank, cfg)
    mask_handles = apply_masks(peft_model.base_model.model, model_structure(base.model), masks)
    try:
        with torch.no_grad():
            return peft_model(input_ids=ids).logits
    finally:
        for h in mask_handles:
            h.remove()
        _release(peft_model, base, handles, own)


@pytest.fixture
def task_identity():
    """Flower's runtime sets the task identity that Message() reads; outside it, tests do."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def mock_reply(node, content=None, error=None):
    """A reply Message from ``node`` as a strategy sees it (no network)."""
    from unittest.mock import Mock

    from flwr.app import Message

    msg = Mock(spec=Message)
    msg.metadata.src_node_id = node
    msg.has_error.return_value = error is not None
    msg.error.reason = error
    msg.content = content
    return msg


class FakeGrid:
    """Nodes 100+i hold client i and answer identify queries; train messages are recorded in ``sent``."""

    def __init__(self, n):
        self.nodes = [100 + i for i in range(n)]
        self.sent = []

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, timeout=None):
        from flwr.app import ConfigRecord, MessageType, RecordDict

        from fedtune.core.protocol import CONFIG, NodeIdentity

        messages = list(messages)
        self.sent.append(messages)
        return [mock_reply(m.metadata.dst_node_id,
                           RecordDict({CONFIG: ConfigRecord(NodeIdentity(m.metadata.dst_node_id - 100).to_config())}))
                for m in messages if m.metadata.message_type == MessageType.QUERY]
