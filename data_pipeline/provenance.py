"""What made a dataset: the tokenizer's identity, recorded in `PREFIX.tokenizer.json` beside `PREFIX.bin/.idx`.

The sidecar holds the tokenizer's kind, vocabulary size, EOD id and fingerprint (sha256 of its file's bytes), and
the sizes of the `.bin`/`.idx` it describes, so a sidecar left beside data rewritten by another tool is caught.
`IndexedDatasetBuilder` writes it with the `.bin/.idx` (renamed into place with them; a build without an identity
removes an old one); Megatron's readers ignore it. `check_tokenizer` is the one check wherever data meets a
tokenizer: a mismatch raises one line naming both; a dataset without a sidecar (made by Megatron or GPT-NeoX tools)
gets a one-line warning and the caller falls back to checking its largest id.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass

from data_pipeline.errors import DatasetError

log = logging.getLogger(__name__)

SUFFIX = ".tokenizer.json"
FORMAT = "growlength-dataset-tokenizer"
VERSION = 1


def sidecar_path(prefix: str) -> str:
    return f"{prefix}{SUFFIX}"


@dataclass(frozen=True)
class TokenizerIdentity:
    """What decides the meaning of a dataset's ids: two datasets (or a dataset and a tokenizer) belong together
    exactly when these are equal."""
    kind: str
    vocab_size: int
    eod_id: int
    fingerprint: str  # sha256 of the tokenizer file (sentencepiece .model, or tokenizer.json)

    @classmethod
    def of(cls, tokenizer) -> "TokenizerIdentity":
        """The identity of a `data_pipeline.tokenizer.Tokenizer`."""
        return cls(tokenizer.kind, int(tokenizer.vocab_size), int(tokenizer.eod_id), tokenizer.fingerprint)

    def describe(self) -> str:
        return f"{self.kind}, {self.vocab_size:,} ids, EOD {self.eod_id}, sha256 {self.fingerprint[:12]}"


def sidecar_bytes(identity: TokenizerIdentity, bin_bytes: int, idx_bytes: int) -> bytes:
    """The sidecar's content for a dataset whose files have these sizes."""
    record = {"format": FORMAT, "version": VERSION, "tokenizer": asdict(identity),
              "dataset": {"bin_bytes": int(bin_bytes), "idx_bytes": int(idx_bytes)}}
    return (json.dumps(record, indent=2) + "\n").encode()


def read_identity(prefix: str) -> TokenizerIdentity | None:
    """The tokenizer identity recorded for PREFIX, or None when it has no sidecar. A sidecar that is unreadable, or
    that describes other .bin/.idx sizes (the data was rewritten by another tool), raises one line naming it."""
    path = sidecar_path(prefix)
    if not os.path.isfile(path):
        return None
    fix = (f"delete {path} (the data is then checked by its largest token id only) or preprocess the data again "
           f"with `python -m data_pipeline.preprocess`")
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
        if record.get("format") != FORMAT or record.get("version") != VERSION:
            raise ValueError(f"format {record.get('format')!r} version {record.get('version')!r}, expected "
                             f"{FORMAT!r} version {VERSION}")
        t, d = record["tokenizer"], record["dataset"]
        identity = TokenizerIdentity(str(t["kind"]), int(t["vocab_size"]), int(t["eod_id"]), str(t["fingerprint"]))
        sizes = int(d["bin_bytes"]), int(d["idx_bytes"])
    except OSError as e:
        raise DatasetError(f"{path}: cannot read ({e.strerror or e}); fix its permissions or {fix}") from None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise DatasetError(f"{path}: not a dataset tokenizer record ({type(e).__name__}: {e}); {fix}") from None
    actual = tuple(os.path.getsize(f"{prefix}{ext}") if os.path.exists(f"{prefix}{ext}") else -1
                   for ext in (".bin", ".idx"))
    if actual != sizes:
        raise DatasetError(f"{path}: records a dataset of {sizes[0]:,}/{sizes[1]:,} bytes (.bin/.idx) but "
                           f"{prefix}.bin/.idx have {actual[0]:,}/{actual[1]:,}: the data was rewritten without "
                           f"it; {fix}")
    return identity


def check_tokenizer(prefix: str, tokenizer, flag: str) -> bool:
    """Refuse a tokenizer that did not make PREFIX (one line naming `flag`, both identities and the fix). Returns
    True when the sidecar vouched for it, False (after a one-line warning) when PREFIX has no sidecar: then the
    caller checks the largest id against the tokenizer's vocabulary, as before."""
    recorded = read_identity(prefix)
    if recorded is None:
        warn_unrecorded(prefix)
        return False
    actual = TokenizerIdentity.of(tokenizer)
    if actual != recorded:
        raise DatasetError(f"{flag} {tokenizer.path} did not make {prefix}: {sidecar_path(prefix)} records "
                           f"({recorded.describe()}) but {flag} is ({actual.describe()}); give the tokenizer that "
                           f"preprocessed the data, or preprocess it again with this one")
    return True


def warn_unrecorded(prefix: str) -> None:
    log.warning("%s: no %s (made by another tool): only its largest token id is checked against the tokenizer",
                prefix, os.path.basename(sidecar_path(prefix)))


def check_checkpoint_tokenizer(directory: str, tokenizer, flag: str) -> None:
    """Refuse continuing a Hugging Face checkpoint `directory` on data of another tokenizer: when the directory
    holds a tokenizer (tokenizer.json / tokenizer.model), `tokenizer` must be a byte-identical copy of one of them.
    A directory without one is not checked (the caller compares vocabulary sizes)."""
    import hashlib
    from pathlib import Path

    files = [f for f in (Path(directory) / "tokenizer.json", Path(directory) / "tokenizer.model") if f.is_file()]
    if not files or any(hashlib.sha256(f.read_bytes()).hexdigest() == tokenizer.fingerprint for f in files):
        return
    raise DatasetError(f"{flag} {directory} was trained with its own tokenizer ({', '.join(f.name for f in files)}), "
                       f"not the run's {tokenizer.path} ({TokenizerIdentity.of(tokenizer).describe()}): its ids mean "
                       f"other text; preprocess the data with the checkpoint's tokenizer (--tokenizer-model "
                       f"{directory}) and set data.tokenizer to it")


class DataFiles:
    """The size, inode and modification time of a dataset's `.bin`/`.idx` when a run opened them: `check` says, in
    one line naming the file, that one was rewritten or replaced under the run (which memory-maps them: reads past a
    truncation end the process with SIGBUS). Cheap (two stat calls): run it at start, at stage switches and before
    each checkpoint, so no checkpoint is saved of steps that read changed data."""

    def __init__(self, prefix: str):
        self.paths = (f"{prefix}.bin", f"{prefix}.idx")
        self.stamps = {p: _stamp(p) for p in self.paths}

    def name_on_sigbus(self) -> None:
        """From now on a SIGBUS (a read of a memory-mapped file that shrank under the process) prints one line
        naming these files and exits 135, instead of a bare "Bus error". Process-wide; the last call wins."""
        name_files_on_sigbus(self.paths)

    def check(self, when: str) -> None:
        for path, then in self.stamps.items():
            now = _stamp(path)
            if now != then:
                what = ("removed" if now is None else f"replaced by another file of {now[0]:,} bytes"
                        if now[1] != then[1] else f"rewritten in place ({then[0]:,} -> {now[0]:,} bytes)")
                raise DatasetError(f"{path}: {what} while this run reads it (found {when}); the steps since may "
                                   f"have read other data, so nothing more is saved: restore the data the run "
                                   f"started with and resume from the last checkpoint, or start a new run_dir on "
                                   f"the new data")


def _stamp(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_size, st.st_ino, st.st_mtime_ns


_sigbus: dict = {}  # the installed C callback (kept alive) and its message


def name_files_on_sigbus(paths) -> None:
    """Install a SIGBUS handler that writes one line naming `paths` to stderr and exits 128 + SIGBUS. A Python
    `signal.signal` handler cannot do this: the faulting read would repeat forever before Python code runs; this
    one is a C-level handler (ctypes) that ends the process from inside the fault."""
    import ctypes
    import signal

    message = (f"error: Bus error (SIGBUS) reading memory-mapped data ({', '.join(paths)}): a file was truncated or "
               f"rewritten under this run; restore the data the run started with and resume from the last "
               f"checkpoint\n").encode()
    if "callback" not in _sigbus:
        handler_type = ctypes.CFUNCTYPE(None, ctypes.c_int)

        def on_sigbus(signum):
            os.write(2, _sigbus["message"])
            os._exit(128 + signum)

        libc = ctypes.CDLL(None)
        libc.signal.restype = ctypes.c_void_p
        libc.signal.argtypes = [ctypes.c_int, handler_type]
        _sigbus["callback"] = handler_type(on_sigbus)
        libc.signal(signal.SIGBUS, _sigbus["callback"])
    _sigbus["message"] = message
