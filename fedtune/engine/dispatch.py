"""How Flower's simulation engine hands messages to its workers, made independent of the fleet size.

Flower 1.42's simulation engine moves messages from the link state to the Ray workers'
queue in a thread (``add_messages_to_queue`` in ``flwr.server.superlink.fleet.vce.vce_api``)
that, every 0.1 s, asks the link state for one undelivered message for every registered node
in turn; each ask scans every stored message under the state's lock. Its work is (registered
nodes) x (messages in flight) per pass, in the server's process and under its interpreter
lock: with 10,000 virtual nodes it dominates a round (``simulations/results/scale.json``).

:func:`pending_dispatch` replaces that thread, for the duration of a simulation, by one that
first collects the destination nodes of the undelivered messages (one scan) and then asks the
link state only for those nodes, in Flower's visiting order, with Flower's own
``get_message_ins`` (which checks expiry and marks delivery as before). Which messages reach
the queue and in which order is unchanged; nodes without a message cost nothing. A link state
that is not Flower's in-memory one (no ``message_ins_store`` and ``lock``) keeps Flower's thread.
``simulation.dispatch = "flower"`` runs Flower's thread as it is.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

__all__ = ["add_pending_messages_to_queue", "pending_dispatch", "pending_nodes"]

POLL_S = 0.1  # Flower's period between passes


def pending_nodes(state: Any) -> set[int]:
    """Destination node ids of the messages in ``state`` not yet delivered (one scan, under its lock)."""
    with state.lock:
        return {m.metadata.dst_node_id for m in list(state.message_ins_store.values())
                if m.metadata.delivered_at == ""}


def add_pending_messages_to_queue(state: Any, queue: Any, nodes_mapping: dict[int, int],
                                  f_stop: threading.Event, *, fallback: Any = None) -> None:
    """Flower's ``add_messages_to_queue`` contract, visiting only nodes with an undelivered message."""
    if not (hasattr(state, "message_ins_store") and hasattr(state, "lock")):
        if fallback is None:
            raise TypeError(f"{type(state).__name__}: not an in-memory link state and no fallback given")
        return fallback(state, queue, nodes_mapping, f_stop)
    order = {node_id: i for i, node_id in enumerate(nodes_mapping)}  # Flower's visiting order
    while not f_stop.is_set():
        for node_id in sorted(pending_nodes(state) & order.keys(), key=order.__getitem__):
            for msg in state.get_message_ins(node_id=node_id, limit=1):
                queue.put(msg)
        f_stop.wait(POLL_S)
    return None


@contextlib.contextmanager
def pending_dispatch(enabled: bool = True) -> Iterator[None]:
    """Within the block, Flower's simulation engine dispatches with :func:`add_pending_messages_to_queue`."""
    if not enabled:
        yield
        return
    import flwr.server.superlink.fleet.vce.vce_api as vce

    original = vce.add_messages_to_queue

    def patched(state: Any, queue: Any, nodes_mapping: Any, f_stop: threading.Event) -> None:
        add_pending_messages_to_queue(state, queue, nodes_mapping, f_stop, fallback=original)

    vce.add_messages_to_queue = patched
    try:
        yield
    finally:
        vce.add_messages_to_queue = original
