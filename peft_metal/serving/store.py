"""The serving layer's persistent prompt store: a prompt is made once per (task, shots, split, base, PGM) and reused.

A store is a folder that several processes can use at once::

    root/
      index.sqlite          one row per stored prompt (WAL journal, busy timeout: concurrent readers and writers)
      prompts/<id>.safetensors   the prompt, exactly as `GeneratedPrompt.save` writes it

Ids are content hashes (`prompt_key`), so the same request always finds the same prompt and two processes making the
same prompt agree on where it goes.

Durability protocol (why a killed process never leaves a half prompt visible):

- put: the file is written under a temporary name in `prompts/`, fsynced and read back, then, inside one
  `BEGIN IMMEDIATE` transaction, renamed to its final name (`os.replace`), the directory fsynced and the row inserted
  (`INSERT OR IGNORE`). A row therefore only becomes visible, at COMMIT, once its file is complete and durable.
- Because the rename happens under the database write lock, a final-named file without a row can only be left by a
  writer that died between rename and COMMIT; such orphans, and temporary files of dead writers, are removed when a
  store is opened or by `verify(repair=True)` (which also take the write lock, so they never race a live writer).
- delete: inside one transaction the row is deleted and the file renamed to a trash name; after COMMIT the trash is
  unlinked. A crash before COMMIT keeps the row, and the next open renames the trash back.
- get: the file's size and sha256 are checked against the row before it is loaded; a mismatch raises
  `DamagedPromptError` and the prompt is never served. `get_or_create`/`put` replace a damaged file with a fresh one.

Refinement jobs (a prompt tuned for many steps before it is stored) have a row in `jobs` while they run and after
they fail or are cancelled; a refined prompt is stored by `put` only once every step is done, so a job that dies
leaves its row and nothing else. When a store is opened, rows of running jobs whose process is gone are marked failed
with the reason, so a restarted server reports them (and redoes them when asked again).

SQLite in WAL mode needs a local filesystem (not NFS): the store is for the processes of one machine.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Optional, Union

from ..metal_prompt.prompt import GeneratedPrompt
from ..metal_prompt.template import normalize_shots

__all__ = ["DamagedPromptError", "PromptNotFoundError", "PromptStore", "prompt_key"]

logger = logging.getLogger(__name__)

INDEX_NAME = "index.sqlite"
PROMPTS_DIR = "prompts"
SUFFIX = ".safetensors"
TEMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
KEY_VERSION = "peft-metal-prompt-key/1"
KEY_LENGTH = 32
SCHEMA_VERSION = 2  # 2: option_priors
DEFAULT_BUSY_TIMEOUT_S = 30.0
STALE_TEMP_S = 3600.0  # a temporary file this old is abandoned even if its writer's pid is (re)used by a live process

_ID_PATTERN = re.compile(rf"^[0-9a-f]{{{KEY_LENGTH}}}$")
_TEMP_PATTERN = re.compile(rf"^{re.escape(TEMP_PREFIX)}(\d+)-[0-9a-f]+{re.escape(SUFFIX)}$")
_TRASH_PATTERN = re.compile(rf"^{re.escape(TRASH_PREFIX)}([0-9a-f]{{{KEY_LENGTH}}})-\d+-[0-9a-f]+{re.escape(SUFFIX)}$")
_COLUMNS = (
    "prompt_id",
    "task",
    "content_hash",
    "design",
    "num_tokens",
    "num_demonstrations",
    "base_fingerprint",
    "created_at",
    "hits",
    "sha256",
    "size",
)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS prompts (
    prompt_id TEXT PRIMARY KEY,
    task TEXT NOT NULL,
    content_hash TEXT NOT NULL,
    design TEXT NOT NULL,
    num_tokens INTEGER NOT NULL,
    num_demonstrations INTEGER NOT NULL,
    base_fingerprint TEXT NOT NULL,
    created_at TEXT NOT NULL,
    hits INTEGER NOT NULL DEFAULT 0,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS prompts_by_task ON prompts (task);
CREATE TABLE IF NOT EXISTS jobs (
    prompt_id TEXT PRIMARY KEY,
    task TEXT NOT NULL,
    status TEXT NOT NULL,
    refine_steps INTEGER NOT NULL,
    unrefined_id TEXT,
    owner_pid INTEGER NOT NULL,
    reason TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS option_priors (
    prompt_id TEXT PRIMARY KEY,
    prior TEXT NOT NULL
);
"""
REFINING = "refining"
FAILED = "failed"
CANCELLED = "cancelled"


class PromptNotFoundError(KeyError):
    """No prompt is stored under this id (a `KeyError`, so `except KeyError` callers keep working)."""

    def __init__(self, prompt_id: str, detail: str = "") -> None:
        self.prompt_id = prompt_id
        self.message = f"No prompt with id {prompt_id!r} in this store{detail}."
        super().__init__(self.message)

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return self.message


class DamagedPromptError(ValueError):
    """A stored prompt's file does not match its index row (or does not load); it is never served."""

    def __init__(self, prompt_id: str, reason: str) -> None:
        self.prompt_id = prompt_id
        self.reason = reason
        super().__init__(
            f"Stored prompt {prompt_id} is damaged: {reason}. It is not served; make it again with "
            "get_or_create/put (which replaces the file) or remove it with delete."
        )


def _plain(value: Any) -> Any:
    """Sets (sorted) and enums (by value), as `MetaLPromptConfig.to_dict()` holds them, so a raw config and the
    JSON-ready copy a prompt stores give one id; anything else unserializable is refused rather than str()-ed, since a
    repr can hold a memory address and would change the id from run to run."""
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, Enum):
        return value.value
    raise TypeError(f"{type(value).__name__} is not JSON-serializable")


def _canonical_json(value: Any, what: str) -> str:
    """One text per value: sorted keys, no whitespace, no NaN, so equal inputs always hash alike."""
    try:
        return json.dumps(
            value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=_plain
        )
    except (TypeError, ValueError) as error:
        raise TypeError(f"{what} must be JSON-serializable (str keys, finite numbers) to be part of a prompt id: {error}") from error


def prompt_key(
    task: str,
    shots: Sequence[Any],
    num_demonstrations: int,
    base_fingerprint: dict[str, Any],
    pgm_config: dict[str, Any],
) -> str:
    """The id of the prompt these inputs make: sha256 (first 32 hex digits) of their canonical JSON.

    Everything that changes the prompt is in it: the task, the shots (in order), the XP/XL split
    (`num_demonstrations`), the base model fingerprint and the PGM config including its design. The PGM's weights are
    not visible here: pass a fingerprint of them inside `pgm_config` (e.g. `{**config, "pgm_weights": digest}`) so a
    retrained PGM never reuses prompts of the old one.
    """
    if not isinstance(task, str):
        raise TypeError(f"task must be a string, got {type(task).__name__}.")
    pairs = normalize_shots(shots)
    if isinstance(num_demonstrations, bool) or not isinstance(num_demonstrations, int):
        raise TypeError(f"num_demonstrations must be an int, got {type(num_demonstrations).__name__}.")
    if not 0 <= num_demonstrations < len(pairs):
        raise ValueError(
            f"num_demonstrations={num_demonstrations} must be between 0 and {len(pairs) - 1} for {len(pairs)} shots."
        )
    for name, value in (("base_fingerprint", base_fingerprint), ("pgm_config", pgm_config)):
        if not isinstance(value, dict):
            raise TypeError(f"{name} must be a dict, got {type(value).__name__}.")
    payload = {
        "key": KEY_VERSION,
        "task": task,
        "shots": [list(pair) for pair in pairs],
        "num_demonstrations": num_demonstrations,
        "base_fingerprint": base_fingerprint,
        "pgm_config": pgm_config,
    }
    return hashlib.sha256(_canonical_json(payload, "the prompt key").encode("utf-8")).hexdigest()[:KEY_LENGTH]


def _check_prior(prior: Any, prompt_id: str) -> None:
    if (
        not isinstance(prior, dict) or not prior
        or not all(isinstance(label, str) and isinstance(p, float) and 0 <= p <= 1 for label, p in prior.items())
    ):
        raise ValueError(f"The option prior of {prompt_id} must map labels to probabilities, got {prior!r}.")


def _hash_file(path: Path, fsync: bool = False) -> tuple[str, int]:
    """sha256 and size of a file, read in chunks; with `fsync`, also flush it to disk first."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "r+b" if fsync else "rb") as handle:
        if fsync:
            os.fsync(handle.fileno())
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable; Windows cannot open directories, and its renames need no such step."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _file_problem(path: Path, sha256: str, size: int) -> Optional[str]:
    """Why the file at `path` is not the one the index recorded, or None if it is."""
    try:
        actual_sha, actual_size = _hash_file(path)
    except FileNotFoundError:
        return f"its file {path.name} is missing"
    except OSError as error:
        return f"its file {path.name} cannot be read ({error})"
    if actual_size != size:
        return f"its file has {actual_size} bytes, the index recorded {size}"
    if actual_sha != sha256:
        return f"its file's sha256 is {actual_sha[:16]}..., the index recorded {sha256[:16]}..."
    return None


def _writer_alive(pid: int) -> bool:
    """Whether the process that owns a temporary file may still be writing it (same machine: see module doc)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


class PromptStore:
    """Content-addressed prompts on disk, indexed in SQLite; safe to share between threads and processes.

    See the module docstring for the on-disk layout and why every write is crash-safe.
    """

    def __init__(
        self,
        root: Union[str, os.PathLike],
        *,
        busy_timeout: float = DEFAULT_BUSY_TIMEOUT_S,
        cleanup_on_open: bool = True,
    ) -> None:
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise NotADirectoryError(f"A prompt store is a folder; {self.root} is a file.")
        self.prompts_dir = self.root / PROMPTS_DIR
        self.prompts_dir.mkdir(parents=True, exist_ok=True)
        self.index_path = self.root / INDEX_NAME
        self._lock = threading.RLock()  # one connection, shared by the threads of a server
        self._db = self._connect(busy_timeout)
        if cleanup_on_open:
            try:
                swept = self._sweep(remove=True)
                self._fail_orphaned_jobs()
            except BaseException:
                self._db.close()
                raise
            if swept["removed"] or swept["restored"]:
                logger.info(
                    "Prompt store %s: removed %d leftover file(s), restored %d interrupted delete(s).",
                    self.root,
                    len(swept["removed"]),
                    len(swept["restored"]),
                )

    # ----------------------------------------------------------------------------------------------------- opening

    def _connect(self, busy_timeout: float) -> sqlite3.Connection:
        db = sqlite3.connect(self.index_path, timeout=busy_timeout, isolation_level=None, check_same_thread=False)
        db.row_factory = sqlite3.Row
        try:
            db.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
            mode = self._with_retry(lambda: db.execute("PRAGMA journal_mode = WAL").fetchone()[0], busy_timeout)
            if str(mode).lower() != "wal":
                raise RuntimeError(
                    f"{self.index_path} cannot use SQLite's WAL journal (got {mode!r}); put the store on a local disk."
                )
            db.execute("PRAGMA synchronous = FULL")  # a committed row survives power loss, not only a crash
            with self._transaction(db):
                version = db.execute("PRAGMA user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    raise RuntimeError(
                        f"{self.index_path} has store schema version {version}; this peft-metal reads up to "
                        f"{SCHEMA_VERSION}. Upgrade peft-metal."
                    )
                for statement in filter(str.strip, _SCHEMA.split(";")):  # executescript would COMMIT early
                    db.execute(statement)
                if version < SCHEMA_VERSION:
                    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except sqlite3.OperationalError:
            db.close()
            raise
        except sqlite3.DatabaseError as error:
            db.close()
            raise ValueError(f"{self.index_path} is not a prompt store index ({error}).") from error
        except BaseException:
            db.close()
            raise
        return db

    @staticmethod
    def _with_retry(action: Callable[[], Any], timeout: float) -> Any:
        """Switching to WAL needs a moment of exclusive access; when many processes open a new store at once, wait."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return action()
            except sqlite3.OperationalError as error:
                if "locked" not in str(error) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    @contextmanager
    def _transaction(self, db: Optional[sqlite3.Connection] = None) -> Iterator[sqlite3.Connection]:
        """A write transaction: BEGIN IMMEDIATE takes the write lock up front (waiting up to the busy timeout)."""
        db = self._db if db is None else db
        with self._lock:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> "PromptStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"PromptStore({str(self.root)!r})"

    # ------------------------------------------------------------------------------------------------------ lookup

    def _path(self, prompt_id: str) -> Path:
        """The file of an id; ids are checked first, so a request can never name a path outside `prompts/`."""
        if not isinstance(prompt_id, str) or not _ID_PATTERN.match(prompt_id):
            raise PromptNotFoundError(str(prompt_id), f" (a prompt id is {KEY_LENGTH} lowercase hex digits)")
        return self.prompts_dir / f"{prompt_id}{SUFFIX}"

    def _row(self, prompt_id: str) -> sqlite3.Row:
        self._path(prompt_id)
        with self._lock:
            row = self._db.execute("SELECT * FROM prompts WHERE prompt_id = ?", (prompt_id,)).fetchone()
        if row is None:
            raise PromptNotFoundError(prompt_id)
        return row

    @staticmethod
    def _as_dict(row: sqlite3.Row) -> dict[str, Any]:
        info = {name: row[name] for name in _COLUMNS}
        try:
            info["base_fingerprint"] = json.loads(info["base_fingerprint"])
        except (TypeError, ValueError):
            raise DamagedPromptError(str(info["prompt_id"]), "its index row's base_fingerprint is not JSON") from None
        return info

    def __contains__(self, prompt_id: object) -> bool:
        if not isinstance(prompt_id, str) or not _ID_PATTERN.match(prompt_id):
            return False
        with self._lock:
            return self._db.execute("SELECT 1 FROM prompts WHERE prompt_id = ?", (prompt_id,)).fetchone() is not None

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM prompts").fetchone()[0])

    def info(self, prompt_id: str) -> dict[str, Any]:
        """The index row (base_fingerprint as a dict), without reading the file."""
        return self._as_dict(self._row(prompt_id))

    def list(self, task: Optional[str] = None) -> list[dict[str, Any]]:
        """Index rows, oldest first; only those of `task` if given. Rows damaged on disk are left out (and logged):
        `verify` reports them."""
        query = "SELECT * FROM prompts" + (" WHERE task = ?" if task is not None else "") + " ORDER BY created_at, rowid"
        with self._lock:
            rows = self._db.execute(query, (task,) if task is not None else ()).fetchall()
        listed = []
        for row in rows:
            try:
                self._path(row["prompt_id"])
                listed.append(self._as_dict(row))
            except (PromptNotFoundError, DamagedPromptError) as error:
                logger.warning("Prompt store %s: index row not listed, %s; run `verify`.", self.root, error)
        return listed

    def get(self, prompt_id: str, device: str = "cpu", count_hit: bool = True) -> GeneratedPrompt:
        """Load a stored prompt after checking its file against the index; counts a hit unless told not to.

        Raises `PromptNotFoundError` (a KeyError) for an unknown id and `DamagedPromptError` (a ValueError) when the
        file is missing, has other bytes than were stored, or does not load as a prompt.
        """
        row = self._row(prompt_id)
        path = self._path(prompt_id)
        problem = _file_problem(path, row["sha256"], row["size"])
        if problem is not None:
            if prompt_id not in self:  # deleted while we looked: not damage
                raise PromptNotFoundError(prompt_id)
            raise DamagedPromptError(prompt_id, problem)
        try:
            prompt = GeneratedPrompt.load(path, device=device)
        except FileNotFoundError:
            if prompt_id not in self:
                raise PromptNotFoundError(prompt_id) from None
            raise DamagedPromptError(prompt_id, f"its file {path.name} disappeared while it was read") from None
        except ValueError as error:
            raise DamagedPromptError(prompt_id, f"its file does not load as a prompt ({error})") from error
        if count_hit:
            with self._lock:
                self._db.execute("UPDATE prompts SET hits = hits + 1 WHERE prompt_id = ?", (prompt_id,))
        return prompt

    # ------------------------------------------------------------------------------------------------------ writing

    def get_or_create(
        self,
        task: str,
        shots: Sequence[Any],
        num_demonstrations: int,
        base_fingerprint: dict[str, Any],
        pgm_config: dict[str, Any],
        make: Callable[[], GeneratedPrompt],
    ) -> tuple[str, GeneratedPrompt, bool]:
        """`(prompt_id, prompt, cached)`: the stored prompt for these inputs, or `make()`'s, stored first.

        `make` is called only when the id is not stored (or its file is damaged, which the new prompt then replaces).
        `cached` is True when the returned prompt came from the store: stored before, or stored by another process
        while `make` ran (its prompt is returned and this one dropped, so every caller gets the same bytes).
        """
        prompt_id = prompt_key(task, shots, num_demonstrations, base_fingerprint, pgm_config)
        try:
            return prompt_id, self.get(prompt_id), True
        except PromptNotFoundError:
            pass
        except DamagedPromptError as error:
            logger.warning("%s Making it again.", error)
        prompt = make()
        if not isinstance(prompt, GeneratedPrompt):
            raise TypeError(f"make() must return a GeneratedPrompt, got {type(prompt).__name__}.")
        self._check_matches(prompt, base_fingerprint, pgm_config)
        if self._store(prompt_id, task, num_demonstrations, prompt):
            return prompt_id, prompt, False
        return prompt_id, self.get(prompt_id), True

    def put(
        self,
        task: str,
        shots: Sequence[Any],
        num_demonstrations: int,
        base_fingerprint: dict[str, Any],
        pgm_config: dict[str, Any],
        prompt: GeneratedPrompt,
    ) -> str:
        """Store a prompt under its id and return the id; an intact prompt already stored there is kept as it is."""
        if not isinstance(prompt, GeneratedPrompt):
            raise TypeError(f"put stores a GeneratedPrompt, got {type(prompt).__name__}.")
        prompt_id = prompt_key(task, shots, num_demonstrations, base_fingerprint, pgm_config)
        self._check_matches(prompt, base_fingerprint, pgm_config)
        self._store(prompt_id, task, num_demonstrations, prompt)
        return prompt_id

    @staticmethod
    def _check_matches(prompt: GeneratedPrompt, base_fingerprint: dict[str, Any], pgm_config: dict[str, Any]) -> None:
        """Refuse to file a prompt under a key that describes another base model or design: it would be served wrongly."""
        if prompt.base_fingerprint != base_fingerprint:
            raise ValueError(
                "The prompt was made for another base model than the base_fingerprint it is stored under; "
                "pass the fingerprint of the model that made it (prompt.base_fingerprint)."
            )
        design = pgm_config.get("prompt_design")
        if design is not None and design != prompt.design:
            raise ValueError(f"pgm_config says prompt_design={design!r} but the prompt is {prompt.design!r}.")

    def _store(self, prompt_id: str, task: str, num_demonstrations: int, prompt: GeneratedPrompt) -> bool:
        """Write the file durably, then publish it with its row; False if an intact copy was already stored."""
        final = self._path(prompt_id)
        temp = self.prompts_dir / f"{TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(8)}{SUFFIX}"
        try:
            prompt.save(temp)
            sha256, size = _hash_file(temp, fsync=True)
            GeneratedPrompt.load(temp)  # never index a file that does not read back
            with self._transaction() as db:
                row = db.execute("SELECT sha256, size FROM prompts WHERE prompt_id = ?", (prompt_id,)).fetchone()
                if row is not None and _file_problem(final, row["sha256"], row["size"]) is None:
                    return False
                os.replace(temp, final)
                _fsync_dir(self.prompts_dir)
                values = (
                    task,
                    prompt.design,
                    prompt.num_tokens,
                    num_demonstrations,
                    _canonical_json(prompt.base_fingerprint, "base_fingerprint"),
                    _now(),
                    sha256,
                    size,
                )
                if row is None:
                    inserted = db.execute(
                        "INSERT OR IGNORE INTO prompts (task, design, num_tokens, num_demonstrations, base_fingerprint,"
                        " created_at, sha256, size, prompt_id, content_hash, hits) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0)",
                        (*values, prompt_id, prompt_id),
                    ).rowcount
                    if inserted != 1:  # impossible under the write lock; never leave a file the row does not describe
                        raise RuntimeError(f"Prompt {prompt_id} appeared in the index during its own insert.")
                else:  # the stored file was damaged: this prompt replaces it
                    db.execute(
                        "UPDATE prompts SET task = ?, design = ?, num_tokens = ?, num_demonstrations = ?,"
                        " base_fingerprint = ?, created_at = ?, sha256 = ?, size = ? WHERE prompt_id = ?",
                        (*values, prompt_id),
                    )
                return True
        finally:
            temp.unlink(missing_ok=True)

    def delete(self, prompt_id: str) -> bool:
        """Remove a prompt; False if it was not stored."""
        if prompt_id not in self:
            return False
        final = self._path(prompt_id)
        trash: Optional[Path] = self.prompts_dir / f"{TRASH_PREFIX}{prompt_id}-{os.getpid()}-{secrets.token_hex(4)}{SUFFIX}"
        with self._transaction() as db:
            if db.execute("DELETE FROM prompts WHERE prompt_id = ?", (prompt_id,)).rowcount == 0:
                return False
            db.execute("DELETE FROM option_priors WHERE prompt_id = ?", (prompt_id,))
            try:
                os.replace(final, trash)
            except FileNotFoundError:
                trash = None
        if trash is not None:
            trash.unlink(missing_ok=True)
        return True

    # ------------------------------------------------------------------------------------------------ option priors

    def put_option_prior(self, prompt_id: str, prior: dict[str, float]) -> None:
        """Record the option prior a stored prompt gives its shots' labels (`inference.read_option_prior`), which
        calibrated option scoring divides out; the prompt must be stored."""
        _check_prior(prior, prompt_id)
        with self._transaction() as db:
            if db.execute("SELECT 1 FROM prompts WHERE prompt_id = ?", (prompt_id,)).fetchone() is None:
                raise PromptNotFoundError(prompt_id, ", so no option prior can be recorded for it")
            db.execute(
                "INSERT OR REPLACE INTO option_priors (prompt_id, prior) VALUES (?, ?)",
                (prompt_id, json.dumps(prior, sort_keys=True)),
            )

    def option_prior(self, prompt_id: str) -> Optional[dict[str, float]]:
        """The option prior recorded for `prompt_id`, or None (made without calibration)."""
        with self._lock:
            row = self._db.execute("SELECT prior FROM option_priors WHERE prompt_id = ?", (prompt_id,)).fetchone()
        if row is None:
            return None
        try:
            prior = json.loads(row["prior"])
            _check_prior(prior, prompt_id)
        except (ValueError, TypeError) as error:
            raise DamagedPromptError(prompt_id, f"its option prior is damaged ({error})") from None
        return prior

    # --------------------------------------------------------------------------------------------------------- jobs

    def begin_job(self, prompt_id: str, task: str, refine_steps: int, unrefined_id: str) -> None:
        """Record that this process refines `prompt_id` (replacing a failed or cancelled run's row)."""
        self._path(prompt_id)
        now = _now()
        with self._transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO jobs (prompt_id, task, status, refine_steps, unrefined_id, owner_pid, reason,"
                " created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, NULL, ?, ?)",
                (prompt_id, task, REFINING, refine_steps, unrefined_id, os.getpid(), now, now),
            )

    def end_job(self, prompt_id: str, status: Optional[str] = None, reason: Optional[str] = None) -> None:
        """A job's end: its row dropped (the prompt is stored, or nobody needs the record), or kept as `status`
        (FAILED or CANCELLED) with the `reason` a client is told."""
        with self._transaction() as db:
            if status is None:
                db.execute("DELETE FROM jobs WHERE prompt_id = ?", (prompt_id,))
            else:
                db.execute(
                    "UPDATE jobs SET status = ?, reason = ?, updated_at = ? WHERE prompt_id = ?",
                    (status, reason, _now(), prompt_id),
                )

    def job(self, prompt_id: str) -> Optional[dict[str, Any]]:
        """The job row of `prompt_id`, or None."""
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE prompt_id = ?", (prompt_id,)).fetchone()
        return dict(row) if row is not None else None

    def _fail_orphaned_jobs(self) -> None:
        """Rows of running jobs whose process is gone: failed, with the reason (their prompt was never stored)."""
        with self._transaction() as db:
            rows = db.execute("SELECT prompt_id, owner_pid FROM jobs WHERE status = ?", (REFINING,)).fetchall()
            for row in rows:
                if not _writer_alive(row["owner_pid"]):
                    reason = (
                        f"the server refining it (pid {row['owner_pid']}) stopped before the last step; nothing was "
                        "stored: send the same request again to refine it anew"
                    )
                    db.execute(
                        "UPDATE jobs SET status = ?, reason = ?, updated_at = ? WHERE prompt_id = ?",
                        (FAILED, reason, _now(), row["prompt_id"]),
                    )

    # ---------------------------------------------------------------------------------------------------- checking

    def _sweep(self, remove: bool) -> dict[str, list[str]]:
        """Files in `prompts/` that no row describes, under the write lock so no live writer is mid-publish.

        `orphans`: final files without a row, temporary files of dead writers, trash of finished deletes (removed if
        `remove`, and listed in `removed`). `interrupted`: trash of a delete that crashed before COMMIT, whose row
        is still there (renamed back if `remove`, and listed in `restored`). `in_progress`: temporary files of live
        writers. `unknown`: files this store did not name; never touched.
        """
        report: dict[str, list[str]] = {
            "orphans": [], "interrupted": [], "in_progress": [], "unknown": [], "removed": [], "restored": []
        }
        now = time.time()
        with self._transaction() as db:
            ids = {row[0] for row in db.execute("SELECT prompt_id FROM prompts")}
            for entry in sorted(os.scandir(self.prompts_dir), key=lambda e: e.name):
                name = entry.name
                temp, trash = _TEMP_PATTERN.match(name), _TRASH_PATTERN.match(name)
                if temp is not None:
                    try:
                        age = now - entry.stat().st_mtime
                    except FileNotFoundError:  # its writer just published or dropped it
                        continue
                    if _writer_alive(int(temp.group(1))) and age < STALE_TEMP_S:
                        report["in_progress"].append(name)
                        continue
                elif trash is not None:
                    prompt_id = trash.group(1)
                    final = self.prompts_dir / f"{prompt_id}{SUFFIX}"
                    if prompt_id in ids and not final.exists():
                        report["interrupted"].append(name)
                        if remove:
                            os.replace(entry.path, final)
                            _fsync_dir(self.prompts_dir)
                            report["restored"].append(name)
                        continue
                elif name.endswith(SUFFIX) and _ID_PATTERN.match(name[: -len(SUFFIX)]):
                    if name[: -len(SUFFIX)] in ids:
                        continue
                else:
                    report["unknown"].append(name)
                    continue
                report["orphans"].append(name)
                if remove:
                    Path(entry.path).unlink(missing_ok=True)
                    report["removed"].append(name)
        return report

    def verify(self, repair: bool = False) -> dict[str, Any]:
        """Check every stored prompt (size, sha256, loads) and the folder for leftovers.

        Returns `ok` (ids), `damaged` ({id: reason}), `orphans` (file names without a row), `interrupted` (trash of
        deletes that crashed before COMMIT), `in_progress` (temporary files of live writers), `unknown` (files the
        store did not name), and with `repair=True` also what it did: `removed` (orphans deleted) and `restored`
        (interrupted deletes rolled back). Damaged prompts are reported, not
        removed: `get_or_create`/`put` replace them, `delete` drops them.
        """
        swept = self._sweep(remove=repair)
        with self._lock:
            rows = self._db.execute("SELECT prompt_id, sha256, size FROM prompts ORDER BY prompt_id").fetchall()
        ok: list[str] = []
        damaged: dict[str, str] = {}
        for row in rows:
            prompt_id = row["prompt_id"]
            if not isinstance(prompt_id, str) or not _ID_PATTERN.match(prompt_id):
                damaged[str(prompt_id)] = f"its index row has an id that is not {KEY_LENGTH} lowercase hex digits"
                continue
            path = self._path(prompt_id)
            problem = _file_problem(path, row["sha256"], row["size"])
            if problem is None:
                try:
                    GeneratedPrompt.load(path)
                except (ValueError, FileNotFoundError) as error:
                    problem = f"its file does not load as a prompt ({error})"
            if problem is None:
                ok.append(prompt_id)
                continue
            with self._lock:
                current = self._db.execute(
                    "SELECT sha256 FROM prompts WHERE prompt_id = ?", (prompt_id,)
                ).fetchone()
            if current is None or current["sha256"] != row["sha256"]:
                continue  # deleted or replaced while we checked: not damage
            damaged[prompt_id] = problem
        report: dict[str, Any] = {"ok": ok, "damaged": damaged, **swept}
        if not repair:
            del report["removed"], report["restored"]
        return report
