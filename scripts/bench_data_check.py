"""Throughput of the driver's data check (`opd_verl.data_check.check_file`) on a generated veRL-format file.

Writes N rows (default 1,000,000: chat prompt, data_source, reward_model, extra_info; a few bad rows), then times,
in one run, the streamed column-wise check and the row-by-row reading it replaces (`pyarrow` table to Python dicts,
no checks at all), and prints both rates and their ratio. Lengths are checked too (max_prompt_length above every
prompt, so the byte bound settles every row and no tokeniser is loaded).

    python scripts/bench_data_check.py [--rows N] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq

from opd_verl.data_check import check_file


class _NoTokens:
    overhead = 16  # template tokens around one message; only rows over the byte bound would be tokenised

    def tokens(self, messages):
        raise AssertionError("no row should need tokenising")


def write_rows(path: str, n: int) -> None:
    idx = pa.array(range(n))
    content = pa.compute.binary_join_element_wise(pa.compute.cast(idx, pa.string()), "+1=", "")
    content = pa.compute.if_else(pa.compute.equal(pa.compute.bit_wise_and(idx, 65535), 7), "  ", content)
    offsets = pa.array(range(n + 1), type=pa.int32())
    prompt = pa.ListArray.from_arrays(
        offsets, pa.StructArray.from_arrays([pa.array(["user"] * n), content], names=["role", "content"])
    )
    ground = pa.compute.cast(idx, pa.string())
    table = pa.table(
        {
            "data_source": pa.array(["bench"] * n),
            "prompt": prompt,
            "ability": pa.array(["math"] * n),
            "reward_model": pa.StructArray.from_arrays(
                [pa.array(["rule"] * n), ground], names=["style", "ground_truth"]
            ),
            "extra_info": pa.StructArray.from_arrays([idx, content], names=["index", "problem"]),
        }
    )
    pq.write_table(table, path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args(argv)
    folder = args.dir or tempfile.mkdtemp(prefix="opd_bench_data_")
    path = os.path.join(folder, "bench.parquet")
    t = time.perf_counter()
    write_rows(path, args.rows)
    print(f"wrote {args.rows} rows ({os.path.getsize(path) / 2**20:.1f} MiB) in {time.perf_counter() - t:.1f} s")

    t = time.perf_counter()
    report = check_file(path, max_prompt_length=64, length=_NoTokens())
    check_s = time.perf_counter() - t
    t = time.perf_counter()
    rows = 0
    for batch in pq.ParquetFile(path).iter_batches(columns=["prompt", "data_source", "reward_model"]):
        rows += len(batch.to_pylist())
    rows_s = time.perf_counter() - t
    assert len(report.bad) == sum(1 for i in range(args.rows) if i & 65535 == 7)
    rate = report.rows / check_s
    print(f"data check: {report.rows} rows in {check_s:.2f} s = {rate:,.0f} rows/s; {len(report.bad)} bad rows found")
    print(f"rows as Python dicts, no checks: {rows_s:.2f} s = {rows / rows_s:,.0f} rows/s")
    print(f"ratio: the check is {rows_s / check_s:.1f}x faster than reading the rows one by one")


if __name__ == "__main__":
    main()
