"""Serves the method Examples.Price: it answers {request, bid, ask, server} to any request.
Prints one line once it serves, then serves until its standard input closes.
The gateway is $KNIT_GATEWAY (else the per-user default)."""

import sys

import knit


def price(args, caller):
    return {"request": args, "bid": 100.25, "ask": 100.75, "server": "python"}


def main():
    with knit.Client("price-server-python") as client:
        client.register("Examples.Price", price)  # runs on knit's dispatcher thread
        print("price-server (python) ready", flush=True)
        sys.stdin.read()  # serve until stdin closes


if __name__ == "__main__":
    try:
        main()
    except knit.KnitError as e:
        sys.exit(f"price-server: {e.status.name}: {e.message}")
