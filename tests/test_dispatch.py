"""The simulation engine's pending-node dispatch delivers what Flower's thread delivers, asking only pending nodes."""

from __future__ import annotations

import queue
import threading
import time
from types import SimpleNamespace

import flwr.server.superlink.fleet.vce.vce_api as vce

from fedtune.engine.dispatch import (
    add_pending_messages_to_queue,
    pending_dispatch,
    pending_nodes,
)


class FakeState:
    """The parts of Flower's InMemoryLinkState the dispatch thread uses, with Flower's delivery rule."""

    def __init__(self, dst_nodes: list[int]) -> None:
        self.lock = threading.RLock()
        self.message_ins_store = {
            f"m{i}": SimpleNamespace(id=f"m{i}", metadata=SimpleNamespace(dst_node_id=n, delivered_at=""))
            for i, n in enumerate(dst_nodes)}
        self.asked: list[int] = []

    def get_message_ins(self, node_id: int, limit: int | None) -> list[SimpleNamespace]:
        self.asked.append(node_id)
        with self.lock:
            found = [m for m in self.message_ins_store.values()
                     if m.metadata.dst_node_id == node_id and m.metadata.delivered_at == ""][:limit]
            for m in found:
                m.metadata.delivered_at = "now"
        return found


def _drain(target, state: FakeState, nodes: dict[int, int], passes_s: float = 0.35) -> list[str]:
    q: queue.Queue = queue.Queue()
    stop = threading.Event()
    t = threading.Thread(target=target, args=(state, q, nodes, stop))
    t.start()
    time.sleep(passes_s)
    stop.set()
    t.join(5)
    assert not t.is_alive()
    return [q.get_nowait().id for _ in range(q.qsize())]


def test_pending_dispatch_delivers_what_flowers_thread_delivers_and_asks_only_pending_nodes():
    nodes = {n: n % 7 for n in range(2000, 0, -1)}  # Flower visits in the mapping's order
    dst = [1500, 3, 1500, 77, 3, 1999]  # two nodes with two messages each: one a pass, Flower's limit=1
    flower_state, ours_state = FakeState(dst), FakeState(dst)
    flower = _drain(vce.add_messages_to_queue, flower_state, nodes)
    ours = _drain(add_pending_messages_to_queue, ours_state, nodes)
    assert ours == flower
    assert sorted(ours) == sorted(f"m{i}" for i in range(len(dst)))
    assert len(flower_state.asked) >= 2 * len(nodes)  # Flower asks every node on every pass
    assert set(ours_state.asked) == set(dst) and len(ours_state.asked) == len(dst)
    assert pending_nodes(ours_state) == set()


def test_pending_dispatch_patches_for_the_block_only_and_falls_back_for_other_states():
    original = vce.add_messages_to_queue
    with pending_dispatch(True):
        patched = vce.add_messages_to_queue
        assert patched is not original
        other = SimpleNamespace(asked=[], get_message_ins=lambda node_id, limit: [])  # no message_ins_store
        assert _drain(patched, other, {1: 0, 2: 1}, 0.15) == []
    assert vce.add_messages_to_queue is original
    with pending_dispatch(False):
        assert vce.add_messages_to_queue is original
