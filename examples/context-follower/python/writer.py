"""Writes a shared context step by step: a first value, five updates of "seq", then a last
update that removes "scratch" and sets "done". The context's name is the first argument."""

import sys

import knit


def main():
    name = sys.argv[1] if len(sys.argv) > 1 else "examples.instrument"
    with knit.Client("context-writer-python") as client:
        ctx = client.contexts
        ctx.set(name, {"symbol": "VOD.L", "writer": "python", "seq": 0, "scratch": True})
        for seq in range(1, 6):
            ctx.update(name, {"seq": seq})
        version = ctx.update(name, {"scratch": None, "done": True})
        print(f"wrote {name} up to version {version}")


if __name__ == "__main__":
    try:
        main()
    except knit.KnitError as e:
        sys.exit(f"context-writer: {e.status.name}: {e.message}")
