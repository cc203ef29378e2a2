"""The modules a rank had imported once training started, for warm spares to import ahead.

A replacement must import what its peers imported before it can join them: torch, the training
framework, the script's own modules, and the submodules only a model or optimizer build loads
(DeepSpeed's Muon module, megatron-core's layer specs). Rank 0 lists its ``sys.modules`` in import
order once training has started (its initial state is committed) and publishes the list in the
job's store (compressed, with a signed digest); each agent hands it to its spares, which import
the names they lack. No list has to be written by hand, and ``--preload`` only adds to it.

A package that the job loads in a special way names the module that loads it so
(``loaded_through``): a spare imports that module in the package's place. megatron-core on a
CPU-only build is imported without its import-time ``torch.compile`` (``megatron.cpu``); a spare
that imported it by name would run other code than its peers.

Pure Python: the agents (the control plane) read the list without importing any of it; only
a spare process imports what it names.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import threading
import zlib

from . import keys
from .auth import AuthError, Signer

# package -> the module a spare imports in its place (before anything under the package)
LOADERS: dict[str, str] = {}
# never imported by name in a spare: the script itself and multiprocessing's alias of it
_SKIP = {"__main__", "__mp_main__", "__parents_main__"}


def loaded_through(package: str, loader: str) -> None:
    """``package`` was loaded by importing ``loader``: a spare imports ``loader`` instead."""
    LOADERS[package] = loader


def _loader_of(name: str):
    for package, loader in LOADERS.items():
        if name == package or name.startswith(package + "."):
            return loader
    return None


def imported() -> dict:
    """This process's imported modules in import order (loaders in place of the packages they
    load) and the absolute directories on its ``sys.path``."""
    names, seen = [], set()
    for name, module in list(sys.modules.items()):
        if module is None or name in _SKIP or name in seen:
            continue
        loader = _loader_of(name)
        if loader and loader not in seen:
            names.append(loader)
            seen.add(loader)
        names.append(name)
        seen.add(name)
    path = [p for p in sys.path if p and os.path.isabs(p) and os.path.isdir(p)]
    return {"modules": names, "path": path}


def publish(store, signer: Signer, listing: dict) -> None:
    raw = zlib.compress(json.dumps(listing).encode(), 6)
    store.set(keys.MODULES, raw)
    store.set(keys.MODULES_DIGEST, signer.sign("modules", sha256=hashlib.sha256(raw).hexdigest(),
                                               count=len(listing["modules"])))


def publish_soon(host: str, port: int, signer: Signer) -> None:
    """Publish this process's listing from a thread of its own (once per job: a replacement
    finds its peers' there already)."""
    from .store import connect

    def run():
        try:
            store = connect(host, port)
            if not store.check([keys.MODULES_DIGEST]):
                publish(store, signer, imported())
        except Exception as e:  # noqa: BLE001 - spares then keep their --preload list
            logging.getLogger("fr_megatron.runtime").warning(
                "could not publish the module list for warm spares: %s", e)

    threading.Thread(target=run, name="fr-modules", daemon=True).start()


def read(store, signer: Signer) -> dict:
    """The published listing; AuthError when its digest is missing, forged or does not match."""
    digest = signer.verify(store.get(keys.MODULES_DIGEST))
    raw = store.get(keys.MODULES)
    if digest.get("kind") != "modules" or \
            hashlib.sha256(raw).hexdigest() != digest.get("sha256"):
        raise AuthError("the published module list does not match its signed digest")
    listing = json.loads(zlib.decompress(raw))
    if not isinstance(listing, dict) or not all(isinstance(n, str)
                                                for n in listing.get("modules", [])):
        raise AuthError("the published module list is malformed")
    return {"modules": listing.get("modules", []),
            "path": [p for p in listing.get("path", []) if isinstance(p, str)],
            "from": digest.get("from")}
