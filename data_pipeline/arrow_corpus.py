"""Reading text columns from Arrow-backed corpora: `.parquet` files (FineWeb's layout), Arrow IPC `.arrow` files,
and a Hugging Face `datasets` directory written by `save_to_disk` (its `state.json` names `.arrow` shards).

Each file is streamed by record batches (only the text column is read), never loaded whole. `iter_rows` yields one
`(row, text)` per row, row counted from 1 within its file, or `(row, DatasetError)` for a bad row (a null or
undecodable value) so the caller can skip and count it. A file that cannot be read to its end (truncated, corrupt,
not Parquet/Arrow), or whose column is missing or not text, raises one `DatasetError` line. pyarrow is imported on
first use; without it the error names the extra to install.
"""
from __future__ import annotations

import json
import os
from typing import Iterator

from data_pipeline.errors import DatasetError

BATCH_ROWS = 4096
INSTALL_HINT = "pip install 'growlength[formats]'"


def require(module: str, what: str, path: str):
    """Import an optional reader dependency, or raise one line naming the input and the extra that installs it."""
    try:
        return __import__(module)
    except ImportError:
        raise DatasetError(f"--input {path}: reading {what} needs {module}, which is not installed; "
                           f"{INSTALL_HINT}") from None


def is_datasets_dir(path: str) -> bool:
    """A directory written by `datasets.Dataset.save_to_disk` (a `state.json` naming its `.arrow` shards)."""
    return os.path.isfile(os.path.join(path, "state.json")) and os.path.isfile(os.path.join(path, "dataset_info.json"))


def datasets_shards(path: str) -> list[str]:
    """The `.arrow` shard files of a `save_to_disk` directory, in the dataset's order."""
    state_path = os.path.join(path, "state.json")
    try:
        with open(state_path, encoding="utf-8") as f:
            files = [d["filename"] for d in json.load(f)["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DatasetError(f"--input {path}: {state_path} is not a `datasets` state file ({e}); save the dataset "
                           f"again with save_to_disk") from None
    shards = [os.path.join(path, name) for name in files]
    for shard in shards:
        if not os.path.isfile(shard):
            raise DatasetError(f"--input {path}: shard {shard} named in state.json is missing; copy the whole "
                               f"directory again")
    return shards


def iter_rows(path: str, column: str, stats) -> Iterator[tuple[int, str | DatasetError]]:
    """(row, text) for every row of a `.parquet`/`.arrow` file; (row, DatasetError) for a bad row. Adds the text
    bytes of each batch to `stats.bytes` as it is read."""
    pa = require("pyarrow", "Arrow/Parquet files", path)
    import pyarrow.compute as pc
    row = 0
    try:
        for batch in _batches(path, column):
            values = batch.column(0)
            if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
                values = values.cast(pa.large_string())  # dictionary-encoded or string_view
            stats.bytes += pc.sum(pc.binary_length(values)).as_py() or 0
            texts = _texts(path, column, values, row)
            for text in texts:
                row += 1
                yield row, text
    except (pa.ArrowException, OSError) as e:  # ArrowInvalid is also a ValueError: caught here, before ours
        where = f"after row {row}" if row else "at its start"
        kind = "Parquet" if path.endswith(".parquet") else "Arrow"
        raise DatasetError(f"{path}: truncated, corrupt or not {kind} data {where} ({str(e).splitlines()[0]}); "
                           f"the file is incomplete: download or write it again") from None


def _batches(path: str, column: str):
    import pyarrow as pa
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq
        # one row group at a time, without pre-buffering: pyarrow would otherwise read every row group's column
        # chunk into memory at the first batch
        with pq.ParquetFile(path, pre_buffer=False) as pf:
            _check_column(path, column, pf.schema_arrow)
            for group in range(pf.num_row_groups):
                yield from pf.iter_batches(batch_size=BATCH_ROWS, row_groups=[group], columns=[column])
        return
    with pa.memory_map(path, "r") as source:
        try:
            reader = pa.ipc.open_stream(source)  # what `datasets` writes
        except pa.ArrowInvalid:
            source.seek(0)
            reader = pa.ipc.open_file(source)
        _check_column(path, column, reader.schema)
        index = reader.schema.get_field_index(column)
        batches = reader if isinstance(reader, pa.ipc.RecordBatchStreamReader) else \
            (reader.get_batch(i) for i in range(reader.num_record_batches))
        for batch in batches:
            yield batch.select([index])


def _check_column(path: str, column: str, schema) -> None:
    import pyarrow as pa
    if column not in schema.names:
        raise DatasetError(f"{path}: no column {column!r} (columns: {schema.names[:10]}); name the text column "
                           f"with --json-keys")
    kind = schema.field(column).type
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
        raise DatasetError(f"{path}: column {column!r} holds {kind}, not text; name the text column with "
                           f"--json-keys")


def _texts(path: str, column: str, values, first_row: int) -> list:
    """The batch's values as str, a DatasetError in place of a null or undecodable one."""
    import pyarrow as pa
    if values.null_count == 0:
        try:
            return values.to_pylist()
        except UnicodeDecodeError:
            pass  # find the row below
    raw = values.cast(pa.large_binary()).to_pylist()
    return [_decode(path, column, first_row + i + 1, b) for i, b in enumerate(raw)]


def _decode(path: str, column: str, row: int, raw: bytes | None) -> str | DatasetError:
    if raw is None:
        return DatasetError(f"{path}:{row}: column {column!r} is null; fix the row or pass --skip-bad-lines")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return DatasetError(f"{path}:{row}: undecodable bytes at byte {e.start + 1} of column {column!r} "
                            f"({e.reason}); the text must be UTF-8 (fix the row or pass --skip-bad-lines)")

