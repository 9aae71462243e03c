"""Run localstripe (a local Stripe stand-in) on 127.0.0.1 with its state in a file of our choice.

localstripe's own command binds every interface and keeps its store in a fixed
/tmp/localstripe.pickle, which the test suite's localstripe instances also use. Here the
store is saved to --state instead, so the demo's customers and payment methods survive a
re-run of `make run` and never collide with tests.

    python scripts/localstripe_server.py --port 8420 --state .run/localstripe/store.pickle
"""

import argparse
import pickle
from pathlib import Path

from aiohttp import web
from localstripe.resources import Store, store
from localstripe.server import app


def _use_state_file(path: Path) -> None:
    def load(self: Store) -> None:
        try:
            with path.open("rb") as f:
                saved = pickle.load(f)  # noqa: S301 - our own file, written below
        except FileNotFoundError:
            self.clear()
            return
        self.clear()
        self.update(saved)

    def dump(self: Store) -> None:
        tmp = path.with_suffix(".tmp")
        with tmp.open("wb") as f:
            pickle.dump(dict(self), f, protocol=pickle.HIGHEST_PROTOCOL)
        tmp.replace(path)

    Store.try_load_from_disk = load
    Store.dump_to_disk = dump


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8420)
    parser.add_argument("--state", type=Path, required=True)
    args = parser.parse_args()
    args.state.parent.mkdir(parents=True, exist_ok=True)
    _use_state_file(args.state)
    store.try_load_from_disk()
    print(f"localstripe on http://127.0.0.1:{args.port}, state in {args.state}", flush=True)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None)


if __name__ == "__main__":
    main()
