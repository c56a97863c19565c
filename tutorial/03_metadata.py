"""Tutorial 03 -- BatchMeta: the handle that names rows without carrying their bytes.

``get_meta`` answers with a :class:`tq_loader.BatchMeta`: which rows (``global_indexes``), of
which partitions, which fields they have and their schemas (dtype, shape), plus small
per-row ``custom_meta`` dicts. It is cheap to slice and combine -- pass it between stages,
split it across workers, merge two stages' views of the same rows -- and ``get_data(meta)``
turns it into a TensorDict whenever the bytes are needed.

What this shows: chunk, concat, select_fields / select_samples, union (columns of the same
rows), reorder (in place), custom meta that travels through the controller, extra_info.

Run: ``python tutorial/03_metadata.py``
"""

from __future__ import annotations

import torch
from tensordict import TensorDict

import tq_loader as tq


def main() -> None:
    tq.init()
    client = tq.get_client()
    n = 8
    client.put(
        TensorDict({"tokens": torch.arange(n * 3).reshape(n, 3), "reward": torch.rand(n)}, batch_size=[n]),
        partition_id="meta_demo",
    )
    meta = client.get_meta(["tokens", "reward"], n, "meta_demo", task_name="t", timeout=10)
    print(f"{meta.size} rows {meta.global_indexes}, fields {meta.field_names}")
    print(
        f"schema of tokens: dtype {meta.field_schema['tokens']['dtype']}, rows 0..: {meta.get_shapes('tokens')[:2]}"
    )

    # chunk: split into 3 nearly equal parts (e.g. one per worker); concat puts them back.
    parts = meta.chunk(3)
    print("chunk(3) sizes:", [p.size for p in parts])
    again = tq.BatchMeta.concat(parts)
    assert again.global_indexes == meta.global_indexes

    # select_samples / select_fields: a subset of rows or columns (new objects, meta unchanged).
    evens = meta.select_samples([0, 2, 4, 6])
    tokens_only = evens.select_fields(["tokens"])
    print(f"select_samples -> {evens.global_indexes}; select_fields -> {tokens_only.field_names}")
    td = client.get_data(tokens_only)
    print("get_data of the selection:", sorted(td.keys()), tuple(td["tokens"].shape))

    # union: the columns of two views of the *same rows*. A later stage writes "advantage" for
    # those rows (put returns their BatchMeta, now with that field too); union of a tokens-only
    # view and an advantage-only view is a handle on both columns.
    adv_meta = client.put(TensorDict({"advantage": torch.randn(4)}, batch_size=[4]), metadata=evens)
    merged = tokens_only.union(adv_meta.select_fields(["advantage"]))
    print("union fields:", merged.field_names)
    assert sorted(client.get_data(merged).keys()) == ["advantage", "tokens"]
    # (to append *different* rows use concat; union of different rows is a SchemaError)
    try:
        evens.union(meta.select_samples([1, 3, 5, 7]))
    except tq.SchemaError:
        print("union of different rows -> SchemaError (use concat)")

    # reorder: permute rows in place; row i becomes old row indices[i].
    rev = evens.copy()
    rev.reorder([3, 2, 1, 0])
    print("reordered:", rev.global_indexes)
    assert client.get_data(rev)["tokens"][0].tolist() == client.get_data(evens)["tokens"][3].tolist()

    # custom meta: one small dict per row. Edit it in the batch, then store it in the controller
    # with set_custom_meta: every later get_meta of those rows carries it.
    evens.update_custom_meta([{"group": i // 2} for i in range(evens.size)])
    evens.custom_meta[0]["note"] = "best sample"  # the list is live: edits stay in the batch
    client.set_custom_meta(evens)
    later = client.get_meta(["tokens"], n, "meta_demo", mode="force_fetch", task_name="peek")
    print("custom meta seen by a later get_meta:", later.get_all_custom_meta()[:3])
    assert later.get_all_custom_meta()[0] == {"group": 0, "note": "best sample"}

    # extra_info: batch-level notes that travel with this object only (not stored).
    merged.extra_info["step"] = 3
    print("extra_info:", merged.extra_info)

    client.clear_partition("meta_demo")
    tq.close()
    print("done")


if __name__ == "__main__":
    main()
