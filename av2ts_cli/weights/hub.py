"""``hf://owner/repo[@revision][/subfolder]``: one file of a Hugging Face Hub repository through huggingface_hub's
cache, and every way that can fail as one line with the hint that fits (docs/model.md, "Checkpoints and the
reference key mapping").

Without a network the Hub fails within seconds (``hub_unreachable``: one bounded request before huggingface_hub's
own, which retries for 24 s), and a cached copy is still used; offline mode (``HF_HUB_OFFLINE=1``), no network, and
a missing repository, revision or file each have their own words. The checkpoint format that these files hold is
``checkpoint.py``'s; ``list_hub_files`` lists a repository (online, or its cached snapshot offline).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from av2ts_cli.errors import CheckpointError, UsageError, describe_os_error

HF_PREFIX = "hf://"


@dataclass(frozen=True)
class HubRef:
    repo_id: str
    revision: str | None
    subfolder: str | None

    @property
    def label(self) -> str:
        rev = f"@{self.revision}" if self.revision else ""
        sub = f"/{self.subfolder}" if self.subfolder else ""
        return f"{HF_PREFIX}{self.repo_id}{rev}{sub}"


_HUB_RE = re.compile(r"^hf://(?P<owner>[\w.\-]+)/(?P<repo>[\w.\-]+)(?:@(?P<rev>[^/]+))?(?:/(?P<sub>.+?))?/?$")


def parse_hub_ref(text: str) -> HubRef:
    """``hf://owner/repo[@revision][/subfolder]`` (a revision is a branch, tag or commit without '/')."""
    match = _HUB_RE.match(text)
    if not match:
        raise UsageError(f"{text}: not a Hugging Face reference; expected hf://owner/repo[@revision][/subfolder]")
    return HubRef(f"{match['owner']}/{match['repo']}", match["rev"], match["sub"])


# How long the Hub may take to answer one request before av2ts calls it unreachable. huggingface_hub retries a
# failed metadata request 5 times with back-off (1 + 2 + 4 + 8 + 8 s) when the file is not cached: measured 24 s
# of silence for `hf://own/rep` with the endpoint's port closed, before its own "cannot reach" error. One request
# with this bound says the same within seconds; HF_HUB_ETAG_TIMEOUT, when set, is the bound instead.
HUB_PROBE_SECONDS = 4.0
# An endpoint found unreachable stays so for this long within one process: a checkpoint is two files (config and
# weights), and a black-holed endpoint would otherwise cost the bound twice before the cached copy is used.
_UNREACHABLE_MEMORY_SECONDS = 60.0
_unreachable: dict[str, tuple[float, str]] = {}  # endpoint -> (time.monotonic() of the verdict, the verdict)
_NETWORK_MODULES = ("httpx", "httpx2", "requests", "urllib3", "httpcore", "httpcore2")


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` is set: huggingface_hub's offline mode, which av2ts's other downloads (Google
    Drive, the VGGish release) honour too."""
    from huggingface_hub import constants  # local: huggingface_hub takes ~0.3 s to import

    return bool(constants.HF_HUB_OFFLINE)


def network_cause(err: BaseException, timeout: float | None = None) -> str:
    """What a failed connection attempt says, in words (the exception chain's socket error or timeout;
    ``timeout``: the bound the request had, for the words)."""
    import errno  # local: only when the Hub failed
    import socket  # local: as above

    seen, visited = err, set()
    while seen is not None and id(seen) not in visited:  # a chain may loop (an exception re-raised as its own cause)
        visited.add(id(seen))
        if isinstance(seen, socket.gaierror):
            return "its host name could not be resolved (no network, or no DNS)"
        if isinstance(seen, TimeoutError) or "timeout" in type(seen).__name__.lower():
            bound = f" within {timeout:g} s (HF_HUB_ETAG_TIMEOUT sets this bound)" if timeout else " in time"
            return f"no answer{bound}"
        if isinstance(seen, OSError) and seen.errno in (errno.ECONNREFUSED,):
            return "the connection was refused"
        if isinstance(seen, OSError) and seen.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
            return "the network is unreachable"
        seen = seen.__cause__ or seen.__context__
    text = " ".join(str(err).split())
    if "name resolution" in text.lower() or "name or service not known" in text.lower():
        return "its host name could not be resolved (no network, or no DNS)"
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def hub_unreachable(timeout: float | None = None) -> str | None:
    """None when the Hugging Face endpoint (``HF_ENDPOINT``) answers one HEAD request (any HTTP status) within
    ``timeout`` seconds (``HF_HUB_ETAG_TIMEOUT`` when set, else ``HUB_PROBE_SECONDS``); otherwise why not, in words
    (``"http://127.0.0.1:9: the connection was refused"``). The request goes through huggingface_hub's own client
    (its proxies, certificates, headers), in a thread with a deadline, so that a name lookup that hangs is bounded
    as well as the connection."""
    import threading  # local: only hf:// references need it

    # local: huggingface_hub takes ~0.3 s to import; only hf:// needs it
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if timeout is None:
        timeout = float(os.environ["HF_HUB_ETAG_TIMEOUT"]) if os.environ.get("HF_HUB_ETAG_TIMEOUT") else \
            HUB_PROBE_SECONDS
    endpoint = constants.ENDPOINT
    remembered = _unreachable.get(endpoint)
    if remembered is not None and time.monotonic() - remembered[0] < _UNREACHABLE_MEMORY_SECONDS:
        return remembered[1]
    outcome: list = []

    def probe() -> None:
        try:
            get_session().head(endpoint, timeout=timeout)
            outcome.append(None)
        except Exception as err:  # any transport failure: the reason is worded below
            outcome.append(err)

    thread = threading.Thread(target=probe, name="av2ts-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    if not outcome:
        verdict = f"{endpoint}: no answer within {timeout:g} s (HF_HUB_ETAG_TIMEOUT sets this bound)"
    elif outcome[0] is None:
        return None
    else:
        err = outcome[0]
        if not is_network_failure(err):
            raise err
        verdict = f"{endpoint}: {network_cause(err, timeout)}"
    _unreachable[endpoint] = (time.monotonic(), verdict)
    return verdict


def _cached_file(ref: HubRef, where: str) -> Path:
    """``where`` (a path in the repository) of ``ref``'s revision from the huggingface_hub cache, looked up on disk
    only (``hf_hub_download(local_files_only=True)`` first asks the endpoint for an agent registry: 3 s more
    against an endpoint that drops packets); the LocalEntryNotFoundError of huggingface_hub when it is not there."""
    # local: huggingface_hub takes ~0.3 s to import; only hf:// needs it
    from huggingface_hub import try_to_load_from_cache

    try:
        from huggingface_hub.errors import LocalEntryNotFoundError  # local: as above
    except ImportError:  # huggingface_hub < 0.23 keeps them in utils
        from huggingface_hub.utils import LocalEntryNotFoundError  # local: as above
    found = try_to_load_from_cache(ref.repo_id, where, revision=ref.revision)
    if isinstance(found, str) and Path(found).is_file():
        return Path(found)
    raise LocalEntryNotFoundError(f"{where} is not in the cache")


def _hub_errors():
    """huggingface_hub's error classes (its ``errors`` module; ``utils`` before 0.23)."""
    try:
        from huggingface_hub import errors  # local: huggingface_hub takes ~0.3 s to import; only hf:// needs it
    except ImportError:  # huggingface_hub < 0.23 keeps them in utils
        from huggingface_hub import utils as errors  # local: as above
    return errors


def is_network_failure(err: BaseException) -> bool:
    """Whether ``err`` is a transport failure (no network, refused, timed out) rather than an answer."""
    return isinstance(err, OSError) or type(err).__module__.split(".")[0] in _NETWORK_MODULES


@contextlib.contextmanager
def _quiet_hub():
    """huggingface_hub's retry warnings kept off the terminal: they would break the one-line error of the CLI."""
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hub_logger.setLevel(level)


def hub_failure(err: Exception, what: str, revision: str, not_cached: Callable[[], str]) -> str | None:
    """THE wording of a failed Hub call, one phrase for the CheckpointError line (None: not a Hub failure, to be
    raised as it is). ``what``: the file or thing asked for; ``not_cached()``: the words for "offline, or no
    connection, and not in the cache" (with the command that fetches it)."""
    errors = _hub_errors()
    offline = getattr(errors, "OfflineModeIsEnabled", errors.LocalEntryNotFoundError)
    if isinstance(err, errors.RepositoryNotFoundError):
        return "repository not found on the Hugging Face Hub (or private/gated: log in with `hf auth login`)"
    if isinstance(err, errors.RevisionNotFoundError):
        return f"revision {revision!r} not found in the repository"
    if isinstance(err, errors.LocalEntryNotFoundError | offline):
        return not_cached()
    if isinstance(err, errors.EntryNotFoundError):
        return f"{what} not found in the repository at revision {revision}"
    if isinstance(err, errors.HfHubHTTPError):
        return f"Hugging Face Hub error for {what}: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
    if isinstance(err, OSError):  # a cache folder that cannot be written, a full disk; network failures (requests)
        cause = describe_os_error(err) if err.errno is not None else network_cause(err)
        return f"could not download {what}: {cause}"
    if isinstance(err, ValueError):
        return f"could not download {what}: {' '.join(str(err).split())}"
    if type(err).__module__.split(".")[0] in _NETWORK_MODULES:  # httpx errors are not OSErrors
        return f"could not reach the Hugging Face Hub for {what}: {network_cause(err)}"
    return None


def hub_download(ref: HubRef, filename: str) -> Path:
    """One file of a hub repository through the huggingface_hub cache; every failure is one CheckpointError line
    whose hint fits the situation: offline mode (``HF_HUB_OFFLINE=1``) and the file not cached; no network (the
    endpoint does not answer within seconds, ``hub_unreachable``) and the file not cached; the repository, the
    revision or the file not found. With no network, a cached copy is used, as huggingface_hub itself does."""
    # local: huggingface_hub takes ~0.3 s to import; only hf:// needs it. Imported first: it configures its logger
    from huggingface_hub import constants, hf_hub_download

    where = f"{ref.subfolder}/{filename}" if ref.subfolder else filename
    revision = ref.revision or "main"
    unreachable = None

    def not_cached() -> str:
        fetch = f"`hf download {ref.repo_id} {where} --revision {revision}`"
        missing = f"{where} (revision {revision}) is not in the Hugging Face cache {constants.HF_HUB_CACHE}"
        if constants.HF_HUB_OFFLINE:
            return (f"{missing} and HF_HUB_OFFLINE is set (offline mode: only the cache is read); unset "
                    f"HF_HUB_OFFLINE to download it, or fetch it once online with {fetch}")
        cause = unreachable or "the Hub could not be reached"
        return (f"{missing} and the Hub could not be reached (no network? {cause}); connect and retry, or "
                f"fetch it on a machine with a network ({fetch}) into the cache this one reads (HF_HUB_CACHE)")

    with _quiet_hub():
        unreachable = None if constants.HF_HUB_OFFLINE else hub_unreachable()
        try:
            if unreachable is not None:  # the cache alone, as huggingface_hub would answer after its retries
                return _cached_file(ref, where)
            return Path(hf_hub_download(ref.repo_id, filename, subfolder=ref.subfolder, revision=ref.revision))
        except Exception as err:
            reason = hub_failure(err, where, revision, not_cached)
            if reason is None:
                raise
    raise CheckpointError(ref.label, reason)


def hub_snapshot(ref: HubRef, patterns: list[str], label: str) -> Path:
    """The snapshot folder of ``ref``'s revision with the files matching ``patterns`` (``snapshot_download``; the
    cache alone when offline or out of reach); failures worded by ``hub_failure``, named ``label``."""
    # local: huggingface_hub takes ~0.3 s to import; only hub references need it
    from huggingface_hub import constants, snapshot_download

    revision = ref.revision or "main"
    unreachable = None

    def not_cached() -> str:
        prefetch = f"hf download {ref.repo_id} --revision {revision} --include " + " ".join(f"'{p}'" for p in patterns)
        why = ("HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE
               else f"the Hub could not be reached ({unreachable})" if unreachable else "the Hub could not be reached")
        return (f"{ref.repo_id} (revision {revision}) is not in the Hugging Face cache {constants.HF_HUB_CACHE} and "
                f"{why}; prefetch it once online with `{prefetch}`")

    with _quiet_hub():
        # without a network huggingface_hub retries for ~24 s before it looks in its cache: probe once (seconds)
        unreachable = None if constants.HF_HUB_OFFLINE else hub_unreachable()
        try:
            return Path(snapshot_download(ref.repo_id, revision=revision, allow_patterns=patterns,
                                          local_files_only=unreachable is not None))
        except Exception as err:
            reason = hub_failure(err, "the model", revision, not_cached)
            if reason is None:
                raise
    raise CheckpointError(label, reason)


# ------------------------------------------------------------------------------------------ a repository's files
def _cached_snapshot(ref: HubRef) -> Path | None:
    """The cached snapshot folder of ``ref``'s revision (huggingface_hub's cache layout: refs/<name> holds the
    commit, snapshots/<commit>/ the files), or None."""
    from huggingface_hub import constants  # local: huggingface_hub takes ~0.3 s to import

    storage = Path(constants.HF_HUB_CACHE) / ("models--" + ref.repo_id.replace("/", "--"))
    revision = ref.revision or "main"
    commit = revision
    if not re.fullmatch(r"[0-9a-f]{40}", revision):
        try:
            commit = (storage / "refs" / revision).read_text().strip()
        except OSError:
            return None
    snapshot = storage / "snapshots" / commit
    return snapshot if snapshot.is_dir() else None


def list_hub_files(ref: HubRef) -> tuple[list[str], str]:
    """(the repository's file paths at ``ref``'s revision, where they were listed: "hub" or "cache").

    Online, the Hub lists them; with ``HF_HUB_OFFLINE`` set, or when the Hub cannot be reached, the cached
    snapshot does (what an earlier download left). One CheckpointError line when neither can.
    """
    # local: huggingface_hub takes ~0.3 s to import; only registry models from the Hub need it
    from huggingface_hub import HfApi, constants

    errors = _hub_errors()
    revision = ref.revision or "main"
    why = "HF_HUB_OFFLINE is set (offline mode: only the cache is read)"
    unreachable = None if constants.HF_HUB_OFFLINE else hub_unreachable()  # seconds, not huggingface_hub's 24 s
    if unreachable is not None:
        why = f"the Hub could not be reached (no network? {unreachable})"
    elif not constants.HF_HUB_OFFLINE:
        with _quiet_hub():
            try:
                return sorted(HfApi().list_repo_files(ref.repo_id, revision=ref.revision)), "hub"
            except (errors.RepositoryNotFoundError, errors.RevisionNotFoundError) as err:
                raise CheckpointError(ref.label, hub_failure(err, "the file list", revision, str)) from None
            except Exception as err:
                if not (is_network_failure(err) or isinstance(err, errors.HfHubHTTPError)):
                    raise
                why = f"the Hub could not be reached ({type(err).__name__})"
    snapshot = _cached_snapshot(ref)
    if snapshot is None:
        raise CheckpointError(ref.label, f"revision {revision} is not in the Hugging Face cache "
                                         f"{constants.HF_HUB_CACHE} and {why}: it needs a network once "
                                         "(`av2ts download NAME` on a machine with one fetches it)")
    files = sorted(str(p.relative_to(snapshot).as_posix()) for p in snapshot.rglob("*") if p.is_file())
    return files, "cache"
