"""The run's records on disk: where every artefact lives and how it is written.

`artifacts` is the layout (`Layout`: data/, models/, runs/, metrics/) and its atomic writes
and digests; `manifest` the per-iteration manifests and training fingerprint that decide what
is done and what is stale; `runlock` one run per project; `report` metrics/iterations.csv and
train.json; `groups` the contract every iteration's files keep (whole groups of G).

May import `stages.config` and `stages.errors` only: everything else builds on it.
"""
