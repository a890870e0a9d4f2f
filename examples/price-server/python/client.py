"""Calls Examples.Price for a symbol (default VOD.L) and prints the invocation result as JSON."""

import json
import sys

import knit


def main():
    symbol = sys.argv[1] if len(sys.argv) > 1 else "VOD.L"
    with knit.Client("price-client-python") as client:
        result = client.invoke("Examples.Price", {"symbol": symbol}, timeout_ms=10000)
        print(json.dumps(result, separators=(",", ":")))


if __name__ == "__main__":
    try:
        main()
    except knit.KnitError as e:  # KnitTimeoutError, RemoteError, NotFoundError, ...
        sys.exit(f"price-client: {e.status.name}: {e.message}")
