"""DICOMweb STOW-RS delivery (PS3.18 10.5) with dicomweb-client: the network half of a push to a
:class:`~common.config.StowDestination`, beside C-STORE in :mod:`worker.pipeline.push`.

It answers exactly what :func:`worker.pipeline.push.send_files` answers, one
:class:`~worker.pipeline.push.SendOutcome` per file, so the job store's per-object delivery state,
backoff, dead-letter and re-push apply unchanged. Per object, from the STOW-RS response
(PS3.18 10.5.3, Store Instances Response Module):

- listed in ReferencedSOPSequence: stored; status 0x0000, or its WarningReason (0xB000 coercion,
  0xB006 elements discarded, 0xB007 data set does not match SOP class), which C-STORE also counts
  as stored;
- listed in FailedSOPSequence: not stored, status its FailureReason (e.g. 0xA700 out of
  resources, 0xC000 cannot understand), retried later on its own; except 0x0111 (duplicate SOP
  instance: the origin server already holds it, e.g. a retry after a lost response), which counts
  as stored, so an object lands once;
- in neither, or no usable response (connection refused, timeout, HTTP 5xx or 4xx without a
  response data set): not stored, status None, retried.

Files are read with pydicom and written into the multipart body by dicomweb-client: the same
elements in the file's own transfer syntax, not a new encoding. Objects go in requests of at most
``max_objects_per_request``, so one failed request costs a part of the push, not all of it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import requests
from dicomweb_client import DICOMwebClient
from pydicom import Dataset, dcmread

from common.config import StowDestination
from worker.pipeline.push import SendOutcome

log = logging.getLogger(__name__)

DUPLICATE_SOP_INSTANCE = 0x0111  # FailureReason: the instance is already stored
_JSON_TYPES = ("application/dicom+json", "application/json")


def make_client(dest: StowDestination) -> DICOMwebClient:
    """A client with our authentication, TLS verification and timeout, and no retries of its own
    (the job store's backoff decides when to try again)."""
    session = requests.Session()
    session.verify = str(dest.ca_file) if dest.ca_file else dest.verify_tls
    # PS3.18 10.5.1.1: the client names the response media type it accepts (dicomweb-client sends */*)
    session.headers["Accept"] = "application/dicom+json"
    headers: dict[str, str] = {}
    if dest.bearer_token is not None:
        headers["Authorization"] = f"Bearer {dest.bearer_token.get_secret_value()}"
    elif dest.username is not None and dest.password is not None:
        session.auth = (dest.username, dest.password.get_secret_value())
    client = DICOMwebClient(url=dest.url, session=session, headers=headers or None, timeout=dest.timeout_s)
    client.set_http_retry_params(retry=False)
    return client


def _response_dataset(response: requests.Response | None) -> Dataset | None:
    """The Store Instances Response data set of an HTTP error response (409, 4xx), if it has one."""
    if response is None or not response.content:
        return None
    if response.headers.get("Content-Type", "").split(";")[0].strip() not in _JSON_TYPES:
        return None
    try:
        return Dataset.from_json(response.json())
    except (ValueError, TypeError, KeyError):
        return None


def outcomes_from_response(paths_by_uid: dict[str, str], response: Dataset | None, why: str) -> list[SendOutcome]:
    """One outcome per file of a request from the Store Instances Response; ``why`` explains
    objects the response does not mention."""
    stored: dict[str, int] = {}
    failed: dict[str, int | None] = {}
    for item in (response.get("ReferencedSOPSequence") or []) if response is not None else []:
        uid = str(item.get("ReferencedSOPInstanceUID", ""))
        warning = item.get("WarningReason")
        stored[uid] = int(warning) if warning is not None else 0x0000
    for item in (response.get("FailedSOPSequence") or []) if response is not None else []:
        uid = str(item.get("ReferencedSOPInstanceUID", ""))
        reason = item.get("FailureReason")
        failed[uid] = int(reason) if reason is not None else None
    out = []
    for uid, path in paths_by_uid.items():
        if uid in stored:
            out.append(SendOutcome(path, stored[uid]))
        elif uid in failed and failed[uid] == DUPLICATE_SOP_INSTANCE:
            out.append(SendOutcome(path, 0x0000))  # already there: it landed on an earlier try
        elif uid in failed:
            code = failed[uid]
            text = f"0x{code:04X}" if code is not None else "without a reason"
            out.append(SendOutcome(path, code, f"STOW-RS: the server refused the object (FailureReason {text})"))
        else:
            out.append(SendOutcome(path, None, why))
    return out


def send_files(
    paths: Sequence[str],
    dest: StowDestination,
    calling_aet: str = "",
    *,
    tls: Any = None,
    timeout_s: float | None = None,
    client: DICOMwebClient | None = None,
) -> list[SendOutcome]:
    """STOW-RS each file; one outcome per path, in order. ``calling_aet`` and ``tls`` exist for
    the C-STORE sender's signature (HTTP carries no AE title; TLS comes from ``dest``)."""
    if not paths:
        return []
    client = client or make_client(dest)
    if timeout_s is not None:
        client._timeout = timeout_s  # noqa: SLF001 - dicomweb-client has no setter
    outcomes: dict[str, SendOutcome] = {}
    batch = dest.max_objects_per_request
    for start in range(0, len(paths), batch):
        chunk = list(paths[start:start + batch])
        datasets: dict[str, Dataset] = {}
        by_uid: dict[str, str] = {}
        for p in chunk:
            try:
                ds = dcmread(p)
            except Exception as exc:  # noqa: BLE001 - an unreadable file fails alone
                outcomes[p] = SendOutcome(p, None, f"cannot read {p}: {exc}")
                continue
            uid = str(ds.SOPInstanceUID)
            datasets[uid], by_uid[uid] = ds, p
        if not datasets:
            continue
        try:
            response = client.store_instances(list(datasets.values()))
            why = f"{dest.key}: the STOW-RS response does not mention this object"
        except requests.HTTPError as exc:
            resp = exc.response
            response = _response_dataset(resp)
            code = resp.status_code if resp is not None else "?"
            why = f"{dest.key}: HTTP {code} {getattr(resp, 'reason', '') or ''}".rstrip()
        except (requests.RequestException, ValueError) as exc:
            response = None
            why = f"cannot store to {dest.key}: {exc.__class__.__name__}: {exc}"[:500]
        for o in outcomes_from_response(by_uid, response, why):
            outcomes[o.path] = o
        if response is not None and "FailedSOPSequence" in response:
            log.warning("STOW-RS partial failure", extra={"destination": dest.key,
                                                          "failed": len(response.FailedSOPSequence)})
    return [outcomes[p] for p in paths]
