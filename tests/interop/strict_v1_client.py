#!/usr/bin/env python3
"""A strict Jetstream v1 client, like PyPI `atproto-jetstream` 0.3.0 (not installable here: it
needs Python >= 3.14): every event becomes a fixed dataclass built from all of its top-level
keys, the 2024 v1 ones (did, time_us, kind, commit/identity/account). An unknown key, such as
the relay's `cursor` field, fails like that library: TypeError, unexpected keyword argument.

Usage: strict_v1_client.py URL COUNT

Reads COUNT events from URL (ws://HOST:PORT/subscribe?...). Exit status 0 and one JSON summary
on stdout when all were built; otherwise the error on stderr and exit status 1.
"""

import json
import sys
from dataclasses import dataclass
from typing import Optional

from websockets.sync.client import connect

# Bound on any single wait, so the script always ends.
WAIT_S = 15.0


@dataclass
class Event:
    """The 2024 v1 event, exactly its top-level keys."""

    did: str
    time_us: int
    kind: str
    commit: Optional[dict] = None
    identity: Optional[dict] = None
    account: Optional[dict] = None


def main():
    url, count = sys.argv[1], int(sys.argv[2])
    events = []
    with connect(url, open_timeout=WAIT_S, max_size=None) as ws:
        while len(events) < count:
            frame = ws.recv(timeout=WAIT_S)
            try:
                events.append(Event(**json.loads(frame)))
            except TypeError as e:
                print(f"strict client failure at event {len(events)}: {e}", file=sys.stderr)
                sys.exit(1)
    print(
        json.dumps(
            {
                "received": len(events),
                "kinds": sorted({e.kind for e in events}),
                "time_us_first": events[0].time_us if events else None,
            }
        )
    )


if __name__ == "__main__":
    main()
