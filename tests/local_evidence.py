"""The operator's local evidence store with its HTTP server, for tests that build a
Controller themselves (core.kube.runtime.start_evidence does the same for the operator)."""

from __future__ import annotations

from pathlib import Path

from core.engine.evidence import LEDGER_DIR
from core.engine.evidence_grants import GrantSigner, LocalGrantingStore, load_secret
from core.kube.evidence_server import EvidenceServer


async def serve_local_evidence(
    workdir: Path, host: str = "127.0.0.1"
) -> tuple[LocalGrantingStore, EvidenceServer]:
    """The store under ``workdir`` and its server listening on ``host`` (any free port);
    close the server when done."""
    signer = GrantSigner(load_secret(workdir / ".evidence-grant-key"))
    store = LocalGrantingStore(workdir / LEDGER_DIR, base_url="", signer=signer)
    server = EvidenceServer(store, signer)
    store.base_url = f"http://{host}:{await server.start(host, 0)}"
    return store, server
