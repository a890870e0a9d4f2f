"""Follows a shared context (the first argument) and prints each version it sees; exits once
the context says "done": true, printing its final value (or fails after 20 s)."""

import json
import sys
import threading

import knit


def main():
    name = sys.argv[1] if len(sys.argv) > 1 else "examples.instrument"
    done = threading.Event()
    last = {}

    def on_change(update):  # runs on knit's dispatcher thread
        print(f"version {update.version}: {json.dumps(update.delta)} removed={update.removed}", flush=True)
        if update.data.get("done") is True:
            last["data"] = update.data
            done.set()

    with knit.Client("context-follower-python") as client:
        with client.contexts.subscribe(name, on_change):
            print(f"following {name}", flush=True)
            if not done.wait(20):
                sys.exit('context-follower: no "done" within 20 s')
        print("followed " + json.dumps(last["data"], separators=(",", ":")))


if __name__ == "__main__":
    try:
        main()
    except knit.KnitError as e:
        sys.exit(f"context-follower: {e.status.name}: {e.message}")
