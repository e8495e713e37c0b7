"""The stores a job input names, opened for a reading stage and checked against its config.

A job's spec says what it expects of each input: ``spec["stores"][role]`` of a feature store
(its marker is the input), ``spec["tokens"][role]`` of a token set (the set's marker is the
input; its stores are opened by layer). Either way the request (``keys.request_hash``) and
the prepared dataset's content hash must match what the store records.
"""

from __future__ import annotations

import json
from functools import cache, cached_property
from pathlib import Path

from pipeline import layout
from pipeline.data import read_manifest
from pipeline.jobs import Job
from pipeline.stores.core import IncompleteStoreError, StaleStoreError
from pipeline.stores.features import FeatureStore
from pipeline.stores.tokens import TokenStore


class TokenSet:
    """The token stores one ``extract_tokens`` job wrote for a (dataset, split, encoder), opened
    by layer and checked against what the reading job's config asks for (``request``)."""

    def __init__(self, marker: str | Path, request: str, content_hash: str) -> None:
        self.marker = Path(marker)
        self.directory = layout.tokens_dir_of_marker(str(marker))
        self.request, self.content_hash = request, content_hash
        self._open = cache(self._open_layer)

    @cached_property
    def layers(self) -> list[int]:
        try:
            return sorted(int(layer) for layer in json.loads(self.marker.read_text())["layers"])
        except (OSError, ValueError, KeyError) as error:
            raise IncompleteStoreError(
                f"token set marker {self.marker} cannot be read ({error}): run its extract_tokens "
                "job"
            ) from error

    def fingerprint_of(self, layer: int) -> str | None:
        """The fingerprint the set's marker lists for ``layer`` (None: the set lacks it)."""
        return json.loads(self.marker.read_text())["layers"].get(str(int(layer)))

    def layer(self, layer: int) -> TokenStore:
        """The checked token store of ``layer`` (opened once); an error says when the set
        lacks it."""
        return self._open(int(layer))

    def _open_layer(self, layer: int) -> TokenStore:
        if layer not in self.layers:
            raise StaleStoreError(
                f"token set {self.directory} holds layers {self.layers}, not {layer}: its "
                "extract_tokens job ran with another layer choice; run it again "
                f"(snakemake --force {self.marker})"
            )
        path = layout.token_store(self.directory, layer)
        store = TokenStore.open_requested(path, self.request, self.content_hash)
        if store.layer != layer:
            raise StaleStoreError(f"token store {path} holds layer {store.layer}, not {layer}")
        return store


def open_input(job: Job, role: str, dataset_role: str) -> FeatureStore | TokenSet:
    """The feature store or token set at input ``role``, checked to hold what this job's config
    asks for (``spec["stores"][role]`` or ``spec["tokens"][role]``) of the prepared dataset at
    input ``dataset_role``."""
    manifest = read_manifest(Path(layout.dataset_of_manifest(job.input(dataset_role))))
    marker, content_hash = job.input(role), manifest["content_hash"]
    if role in job.spec.get("tokens", {}):
        return TokenSet(marker, job.spec["tokens"][role], content_hash)
    store = layout.store_of_marker(marker)
    return FeatureStore.open_requested(store, job.spec["stores"][role], content_hash)
