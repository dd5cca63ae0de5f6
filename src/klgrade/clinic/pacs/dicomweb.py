"""``klgrade pacs``: QIDO-RS finds knee studies, WADO-RS fetches, the clinic grades, STOW-RS stores.

One cycle (``PacsJob.run_once``):
1. QIDO-RS: CR and DX series (``Modality`` filter, paged); a study is a candidate when one of them
   is labelled a knee (BodyPartExamined, else the series description).
2. QIDO-RS per candidate: the study's series. A series whose description is this run's SR series
   (``klgrade KL report <weights sha1>``) means the study is done: skipped, nothing is added.
3. WADO-RS: each instance of the study's CR/DX series, in its stored transfer syntax, graded by
   ``klgrade.clinic.pacs.grading.grade_instance`` (the clinic's ``Grader``, as ``klgrade predict``).
4. STOW-RS into the study: one SC per graded film, then the SR (graded knees and every instance
   not graded with its reason). The SR goes last: it is what marks the study as done.

The log names a study only by ``study_label`` (a hash of its UID), never by patient data; the
credentials (``KLGRADE_PACS_BASIC`` = user:password, or ``KLGRADE_PACS_TOKEN`` = bearer token)
go into the HTTP session and nowhere else.
"""
from __future__ import annotations

import hashlib
import logging
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

log = logging.getLogger("klgrade.clinic.pacs")

ENV_BASIC = "KLGRADE_PACS_BASIC"
ENV_TOKEN = "KLGRADE_PACS_TOKEN"
MODALITIES = ("CR", "DX")
SERIES_FIELDS = ("StudyInstanceUID", "SeriesInstanceUID", "Modality", "SeriesDescription", "BodyPartExamined")
# WADO-RS in the stored transfer syntax: no transcoding on the server, the same bytes predict reads.
AS_STORED = (("application/dicom", "*"),)


class PacsUnreachable(RuntimeError):
    """The PACS did not answer, or refused us: one line, no credentials."""


def safe_url(url: str) -> str:
    """The URL without any user:password@ part (for messages)."""
    p = urlsplit(url)
    return urlunsplit(p._replace(netloc=p.hostname + (f":{p.port}" if p.port else ""))) if p.hostname else url


def study_label(uid: str) -> str:
    """How the log names a study: 10 hex digits of sha1(StudyInstanceUID), not the UID itself."""
    return "study " + hashlib.sha1(str(uid).encode()).hexdigest()[:10]


def make_client(url: str, env: dict, timeout: float = 30):
    """A DICOMweb client whose session carries the credentials from ``env`` (if any)."""
    from dicomweb_client.api import DICOMwebClient
    from dicomweb_client.session_utils import create_session, create_session_from_user_pass

    basic, token = env.get(ENV_BASIC), env.get(ENV_TOKEN)
    if basic:
        user, _, password = basic.partition(":")
        session = create_session_from_user_pass(user, password)
    else:
        session = create_session()
    if token:
        session.headers["Authorization"] = f"Bearer {token}"
    # No gzip (requests asks for it by default): pixel data compresses poorly, and Orthanc took
    # ~0.7 s to gzip a 10 MB film on the fly that it sends as stored in ~0.03 s on localhost.
    session.headers["Accept-Encoding"] = "identity"
    client = DICOMwebClient(url, session=session, timeout=timeout)
    # No retries inside the library (5 attempts, ~30 s of backoff per request): the poll loop
    # retries whole cycles with its own backoff and says so once per failure.
    client.set_http_retry_params(retry=False)
    return client


def _ds(item: dict):
    from pydicom import Dataset

    return Dataset.from_json(item)


@dataclass
class CycleReport:
    candidates: int = 0
    already_done: int = 0
    stored: int = 0  # studies that got results this cycle
    not_graded: int = 0  # of those, studies where nothing could be graded
    failed: list[str] = field(default_factory=list)  # one line per study that failed (retried later)


class PacsJob:
    """Everything one ``klgrade pacs`` process does against one DICOMweb endpoint."""

    def __init__(self, client, grader, model, url: str = ""):
        from klgrade.clinic.pacs.sr import series_description

        self.client, self.grader, self.model = client, grader, model
        self.url = safe_url(url or getattr(client, "base_url", ""))
        self.marker = series_description(model)

    # ------------------------------------------------------------------ DICOMweb calls
    def _call(self, what: str, fn, *args, **kwargs):
        """Run one DICOMweb request; connection failures and auth refusals become PacsUnreachable."""
        import requests

        try:
            return fn(*args, **kwargs)
        except (requests.ConnectionError, requests.Timeout) as e:
            raise PacsUnreachable(f"cannot reach the PACS at {self.url} ({what}: {type(e).__name__})") from None
        except requests.HTTPError as e:
            code = e.response.status_code if e.response is not None else "?"
            if code in (401, 403):
                raise PacsUnreachable(f"the PACS at {self.url} refused access ({what}: HTTP {code}); "
                                      f"check {ENV_BASIC} or {ENV_TOKEN}") from None
            if code in (502, 503, 504):
                raise PacsUnreachable(f"the PACS at {self.url} is unavailable ({what}: HTTP {code})") from None
            raise

    def candidates(self) -> list[str]:
        """Study UIDs with a CR/DX series labelled knee (in the order the PACS lists them)."""
        from klgrade.clinic.pacs.grading import not_knee_reason

        studies: dict[str, None] = {}
        for modality in MODALITIES:
            found = self._call("QIDO-RS", self.client.search_for_series, search_filters={"Modality": modality},
                               fields=list(SERIES_FIELDS), get_remaining=True)
            for item in found:
                ds = _ds(item)
                if ds.get("StudyInstanceUID") and not not_knee_reason(ds):
                    studies.setdefault(str(ds.StudyInstanceUID))
        return list(studies)

    def study_series(self, study: str) -> list:
        found = self._call("QIDO-RS", self.client.search_for_series, study_instance_uid=study,
                           fields=list(SERIES_FIELDS), get_remaining=True)
        return [_ds(item) for item in found]

    # ------------------------------------------------------------------ one study
    def grade_study(self, study: str, series: list, tmp: Path) -> list:
        """Fetch and grade every CR/DX instance of the study: [InstanceResult]."""
        from klgrade.clinic.pacs.grading import grade_instance
        from klgrade.ingest.dicom import read_dataset

        results = []
        for s in series:
            if str(s.get("Modality", "")).upper() not in MODALITIES:
                continue
            sid = str(s.SeriesInstanceUID)
            items = self._call("QIDO-RS", self.client.search_for_instances, study_instance_uid=study,
                               series_instance_uid=sid, fields=["SOPInstanceUID"], get_remaining=True)
            for item in items:
                sop = str(_ds(item).SOPInstanceUID)
                ds = self._call("WADO-RS", self.client.retrieve_instance, study, sid, sop, media_types=AS_STORED)
                path = tmp / f"{len(results)}.dcm"
                ds.save_as(path, enforce_file_format=True)
                header = read_dataset(path, stop_before_pixels=True)
                label = f"{study_label(study)} instance {len(results) + 1}"
                res = grade_instance(self.grader, path, header, display=label)
                if res.reason:
                    log.info("%s: not graded: %s", label, res.reason)
                results.append(res)
                path.unlink()
        return results

    def process(self, study: str, report: CycleReport) -> None:
        from klgrade.clinic.pacs.results import study_objects

        series = self.study_series(study)
        if any(str(s.get("SeriesDescription", "")) == self.marker for s in series):
            report.already_done += 1
            return
        with tempfile.TemporaryDirectory(prefix="klgrade-pacs-") as tmp:
            results = self.grade_study(study, series, Path(tmp))
        if not results:
            return
        objects = study_objects(results, self.model)
        self._call("STOW-RS", self.client.store_instances, objects, study_instance_uid=study)
        graded = [k for r in results for k in r.graded]
        report.stored += 1
        report.not_graded += not graded
        grades = ", ".join(f"{k['side_name']} KL {k['klg']}" for k in graded) or "nothing graded"
        log.info("%s: %s; stored %d SC + SR", study_label(study), grades, len(objects) - 1)

    def run_once(self) -> CycleReport:
        """One cycle. Raises PacsUnreachable when the PACS cannot be queried at all; a study that
        fails midway is reported in ``failed`` and retried next cycle (nothing marks it done)."""
        from tqdm.auto import tqdm

        report = CycleReport()
        studies = self.candidates()
        report.candidates = len(studies)
        for study in tqdm(studies, desc="pacs studies", disable=None, leave=False):
            try:
                self.process(study, report)
            except PacsUnreachable:
                raise
            except Exception as e:  # noqa: BLE001 - one bad study must not stop the others
                line = f"{study_label(study)}: failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
                log.warning("%s", line)
                report.failed.append(line)
        return report


def poll(job: PacsJob, interval: float, stop: threading.Event | None = None, max_backoff: float = 300.0,
         echo=None) -> None:
    """Run cycles every ``interval`` s until ``stop`` is set. While the PACS is unreachable, wait
    interval, 2x, 4x ... (at most ``max_backoff``) and say so in one line per failure."""
    import sys

    stop = stop or threading.Event()
    echo = echo or (lambda line: print(line, file=sys.stderr, flush=True))
    failures = 0
    while not stop.is_set():
        t0 = time.monotonic()
        try:
            rep = job.run_once()
        except PacsUnreachable as e:
            failures += 1
            delay = min(max(interval, 0.5) * 2 ** min(failures - 1, 16), max(max_backoff, interval))
            echo(f"klgrade pacs: {e}; retrying in {delay:g} s")
            stop.wait(delay)
            continue
        if failures:
            echo(f"klgrade pacs: the PACS at {job.url} answers again")
            failures = 0
        if rep.stored or rep.failed:
            echo(summary(rep))
        stop.wait(max(0.0, interval - (time.monotonic() - t0)))


def summary(rep: CycleReport) -> str:
    return (f"klgrade pacs: {rep.candidates} knee studies, {rep.already_done} already graded by this run, "
            f"{rep.stored} graded and stored ({rep.not_graded} with nothing gradable), {len(rep.failed)} failed")
