"""Who receives which frame of a turn: the delivery rules as one pure function (DESIGN §5 guarantee 1).

The actor performs a turn's effects in order. Two rules keep every device's stream gap- and duplicate-free:
- a device that joined during the turn receives nothing before the welcome of its *last* join: that welcome
  holds every earlier change of the turn, so an earlier frame would arrive twice (and before the welcome). Frames
  are addressed by device, and a device that reconnected within the turn has frames of each connection: only
  those from its newest connection's welcome on are for the link it has now;
- a frame goes only to devices connected when the turn's effects are performed.
What happens when a device's send queue overflows is decided where the device is connected (transport's send
queue): it drops the superseded frames and asks the actor for a fresh welcome, which removes them again.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence, Set

from actors.session import Broadcast, Effect, Send

NOBODY: list[str] = []


def recipients(
    effects: Sequence[Effect], connected: Collection[str], joined: Set[str]
) -> Iterator[tuple[Effect, list[str]]]:
    """Every effect of the turn, in order, with the devices its frame goes to (none for other effects)."""
    opened_at: dict[str, int] = {}  # device -> index of its last join's welcome
    if joined:
        for index, effect in enumerate(effects):
            if isinstance(effect, Send) and effect.opens and effect.device in joined:
                opened_at[effect.device] = index
    awaiting = set(opened_at)
    for index, effect in enumerate(effects):
        if isinstance(effect, Broadcast):
            exclude = effect.exclude
            if awaiting:
                yield effect, [d for d in connected if d != exclude and d not in awaiting]
            else:
                yield effect, [d for d in connected if d != exclude]
        elif isinstance(effect, Send):
            device = effect.device
            if device not in connected:
                yield effect, NOBODY
            elif device not in awaiting:
                yield effect, [device]
            elif opened_at[device] == index:
                awaiting.discard(device)
                yield effect, [device]
            else:
                yield effect, NOBODY
        else:
            yield effect, NOBODY
