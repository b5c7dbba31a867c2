"""A batch too big for one process, on Dask: each partition is a journaled map of its own.

    pip install . dask
    export CODEWORDS_API_KEY=cwk-...
    python examples/dask_batch.py SERVICE_ID rows.jsonl journals/ > outputs.jsonl

reads one run's inputs a line (JSON Lines) and writes a line of JSON a row, in input order:
``{"index": 0, "output": ...}`` or ``{"index": 1, "error": {"type": "RunFailed", "message": ...}}``
(bytes as ``"output_base64"``). Kill it at any point and run the same command again: each
partition's journal replays what finished and waits for what was sent, so no run is paid twice.

The client pickles into Dask's worker processes with its settings; the key does not travel in the
pickle when it comes from $CODEWORDS_API_KEY, which each worker reads from its own environment.
Journals live on local disk, one a partition: a journal is locked by one map at a time, and
SQLite's write-ahead log needs the shared memory of one machine (docs/reference.md#dask).
"""

import argparse
import base64
import json
import os
import sys
from typing import Any, Dict, List, Sequence

import dask

import codewords_lite as cw

PARTITION_SIZE = 500  # rows a partition, and so a journal


def run_partition(rows: Sequence[Any], client: cw.Client, service_id: str, journal: str) -> List[Any]:
    """One partition's outputs, or their exceptions, mapped with a journal of its own."""
    return list(client.map(service_id, rows, journal=journal, return_exceptions=True))


def run_batch(
    client: cw.Client, service_id: str, rows: Sequence[Any], journals: str, size: int = PARTITION_SIZE, **compute: Any
) -> List[Any]:
    """Every row's output or exception, in order. Partition k holds rows k*size to (k+1)*size and
    keeps its journal in JOURNALS/k.db, so the same rows find the same journal when the batch is run
    again; a batch of another service, size or row count is refused in that directory."""
    _claim(journals, {"service_id": service_id, "partition_size": size, "rows": len(rows)})
    tasks = [
        dask.delayed(run_partition)(rows[start : start + size], client, service_id, os.path.join(journals, f"{k}.db"))
        for k, start in enumerate(range(0, len(rows), size))
    ]
    return [outcome for partition in dask.compute(*tasks, **compute) for outcome in partition]


def _claim(journals: str, batch: Dict[str, Any]) -> None:
    """Write down which batch this directory's journals belong to, or refuse another one."""
    os.makedirs(journals, exist_ok=True)
    path = os.path.join(journals, "batch.json")
    if os.path.exists(path):
        with open(path) as file:
            recorded = json.load(file)
        if recorded != batch:
            raise SystemExit(f"{journals} holds the journals of another batch ({recorded}): use another directory")
        return
    with open(path + ".new", "w") as file:
        json.dump(batch, file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(path + ".new", path)


def line(index: int, outcome: Any) -> str:
    """An outcome as a line of JSON Lines."""
    if isinstance(outcome, BaseException):
        return json.dumps({"index": index, "error": {"type": type(outcome).__name__, "message": str(outcome)}})
    if isinstance(outcome, bytes):
        return json.dumps({"index": index, "output_base64": base64.b64encode(outcome).decode()})
    return json.dumps({"index": index, "output": outcome})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("service_id")
    parser.add_argument("rows", help="a JSON Lines file: one run's inputs a line")
    parser.add_argument("journals", help="a directory on local disk for the partitions' journals")
    parser.add_argument("--partition-size", type=int, default=PARTITION_SIZE)
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="Dask worker processes")
    args = parser.parse_args()
    with open(args.rows, encoding="utf-8") as file:
        rows = [json.loads(text) for text in file if text.strip()]
    with cw.Client() as client:
        outcomes = run_batch(
            client,
            args.service_id,
            rows,
            args.journals,
            args.partition_size,
            scheduler="processes",
            num_workers=args.workers,
        )
    for index, outcome in enumerate(outcomes):
        print(line(index, outcome))
    return int(any(isinstance(outcome, BaseException) for outcome in outcomes))


if __name__ == "__main__":
    sys.exit(main())
