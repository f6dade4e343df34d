"""The bucket (R2 or any S3-compatible endpoint) through boto3: small objects, listings, the
round-trip check, and botocore's errors turned into ours, each naming what to fix."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from modelferry.tasks.records import layout
from modelferry.tasks.errors import (AccessDenied, BadCredentials, BucketError, BucketNotFound, EndpointUnreachable,
                          TransientBucketError, first_line)
from modelferry.tasks.settings import Settings, s3_client


def translate(exc: Exception, settings: Settings) -> Exception:
    """A botocore exception as one of our BucketErrors (anything else is returned unchanged)."""
    from botocore import exceptions as bx

    where = f"{settings.endpoint} (R2_ENDPOINT)"
    if isinstance(exc, bx.SSLError):  # the same answer every time: not worth a retry
        return BucketError(f"TLS failed with {where}: check the scheme (https:// for R2, http:// for a plain "
                           f"local server) and the certificate ({first_line(exc, 160)})")
    if isinstance(exc, (bx.EndpointConnectionError, bx.ConnectTimeoutError)):
        return EndpointUnreachable(f"cannot connect to {where}: {type(exc).__name__}; check R2_ENDPOINT and that the server is up")
    if isinstance(exc, (bx.ReadTimeoutError, bx.ConnectionClosedError)):
        return TransientBucketError(f"{where} stopped answering: {type(exc).__name__}")
    if isinstance(exc, bx.ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code == "InvalidAccessKeyId":
            return BadCredentials(f"{where} does not know R2_ACCESS_KEY: check the key id of your API token")
        if code == "SignatureDoesNotMatch":
            return BadCredentials(f"{where} rejected the signature: R2_SECRET_KEY does not belong to R2_ACCESS_KEY")
        if code == "NoSuchBucket":
            return BucketNotFound(f"bucket {settings.bucket!r} (R2_BUCKET) does not exist at {where}: create it first")
        if code in ("AccessDenied", "Forbidden") or (status == 403 and code in ("", "403")):
            return AccessDenied(
                f"access denied to bucket {settings.bucket!r}: the token needs Object Read & Write on it"
            )
        if status >= 500 or code in ("SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout"):
            return TransientBucketError(f"{where} failed ({status} {code}); will retry")
        return BucketError(f"{where} answered {status} {code}: {err.get('Message', '')}".strip())
    if isinstance(exc, bx.BotoCoreError):
        return TransientBucketError(f"{where}: {exc}")
    return exc


@dataclass
class ObjectInfo:
    size: int
    etag: str
    modified: float = 0.0  # epoch seconds


class Bucket:
    """One bucket with the R2 profile. Every method raises BucketError subclasses."""

    def __init__(self, settings: Settings, **client_kwargs):
        self.settings = settings
        self.name = settings.bucket
        self.s3 = s3_client(settings, **client_kwargs)

    def uri(self, key: str) -> str:
        return f"s3://{self.name}/{key}"

    def _call(self, op: str, tolerate: tuple[str, ...] = (), **kwargs):
        """Call an S3 operation on this bucket; None when the error code is one of `tolerate`."""
        from botocore.exceptions import ClientError

        try:
            return getattr(self.s3, op)(Bucket=self.name, **kwargs)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in tolerate:
                return None
            raise translate(exc, self.settings) from exc
        except Exception as exc:
            raise translate(exc, self.settings) from exc

    def listing(self, prefix: str) -> dict[str, ObjectInfo]:
        """Every object under `prefix` with its size and ETag, in one paginated listing."""
        out: dict[str, ObjectInfo] = {}
        token = None
        while True:
            kwargs = {"Prefix": prefix, **({"ContinuationToken": token} if token else {})}
            page = self._call("list_objects_v2", **kwargs)
            for obj in page.get("Contents", []):
                out[obj["Key"]] = ObjectInfo(obj["Size"], obj["ETag"].strip('"'), obj["LastModified"].timestamp())
            if not page.get("IsTruncated"):
                return out
            token = page["NextContinuationToken"]

    def probe(self) -> None:
        """One cheap request, tried once, that fails at once on a wrong endpoint, scheme, key or
        bucket: asked before a stage starts (and before a retried transfer), so a dead endpoint is
        an error in a second, not after every request's retries. Its failure is never retried."""
        once = Bucket(self.settings, attempts=1)
        try:
            once._call("list_objects_v2", Prefix=layout.FACTS, MaxKeys=1)
        except BucketError as exc:
            exc.transient = False
            raise

    def head(self, key: str) -> ObjectInfo | None:
        """Size and ETag of one object, or None when there is no such object."""
        head = self._call("head_object", Key=key, tolerate=("404", "NoSuchKey", "NotFound"))
        if head is None:
            return None
        return ObjectInfo(head["ContentLength"], head["ETag"].strip('"'), head["LastModified"].timestamp())

    def head_metadata(self, key: str) -> dict[str, str]:
        """The object's user metadata (x-amz-meta-*), lower-cased keys."""
        head = self._call("head_object", Key=key)
        return {k.lower(): v for k, v in head.get("Metadata", {}).items()}

    def get_bytes(self, key: str) -> bytes | None:
        """The object's bytes, or None when there is no such object."""
        response = self._call("get_object", Key=key, tolerate=("NoSuchKey", "404"))
        return None if response is None else response["Body"].read()

    def get_json(self, key: str):
        data = self.get_bytes(key)
        return None if data is None else json.loads(data)

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        self._call("put_object", Key=key, Body=data, ContentType=content_type)

    def put_json(self, key: str, value) -> int:
        data = (value if isinstance(value, str) else json.dumps(value, indent=1, sort_keys=True)).encode()
        self.put_bytes(key, data, "application/json")
        return len(data)

    def put_if_absent(self, key: str, data: bytes) -> str | None:
        """Create `key` only if it doesn't exist (If-None-Match: *). Returns the new ETag, None when
        it exists. R2 and S3 honour the condition; a server that ignores it (rclone serve s3) just
        overwrites."""
        out = self._call("put_object", Key=key, Body=data, ContentType="application/json", IfNoneMatch="*",
                         tolerate=("PreconditionFailed", "ConditionalRequestConflict"))
        return out["ETag"].strip('"') if out else None

    def put_if_match(self, key: str, data: bytes, etag: str) -> str | None:
        """Replace `key` only while it still has `etag` (If-Match). Returns the new ETag, None when
        someone else changed or removed it first. R2 and S3 honour the condition."""
        out = self._call("put_object", Key=key, Body=data, ContentType="application/json", IfMatch=f'"{etag}"',
                         tolerate=("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "404"))
        return out["ETag"].strip('"') if out else None

    def get_bytes_and_etag(self, key: str) -> tuple[bytes, str] | None:
        """The object's bytes with the ETag they had, or None when there is no such object."""
        response = self._call("get_object", Key=key, tolerate=("NoSuchKey", "404"))
        if response is None:
            return None
        return response["Body"].read(), response["ETag"].strip('"')

    def delete(self, keys: list[str]) -> None:
        for i in range(0, len(keys), 1000):
            self._call("delete_objects", Delete={"Objects": [{"Key": k} for k in keys[i:i + 1000]], "Quiet": True})

    def copy(self, source_key: str, key: str, size: int, part_size: int) -> None:
        """Server-side copy inside the bucket: no byte passes through this machine. Objects over
        5 GiB (CopyObject's limit) go part by part at `part_size`."""
        source = {"Bucket": self.name, "Key": source_key}
        if size <= 5 * 1024**3:
            self._call("copy_object", CopySource=source, Key=key, MetadataDirective="COPY")
            return
        from boto3.s3.transfer import TransferConfig

        try:
            self.s3.copy(source, self.name, key, Config=TransferConfig(multipart_threshold=part_size,
                                                                        multipart_chunksize=part_size))
        except Exception as exc:
            raise translate(exc, self.settings) from exc

    def multipart_uploads(self, prefix: str) -> list[tuple[str, str, float]]:
        """Unfinished multipart uploads under `prefix`: (key, upload id, initiated epoch seconds)."""
        out, marks = [], {}
        while True:
            # rclone serve s3 answers NoSuchUpload when there are none
            page = self._call("list_multipart_uploads", Prefix=prefix, tolerate=("NoSuchUpload",), **marks)
            if page is None:
                return out
            out += [(u["Key"], u["UploadId"], u["Initiated"].timestamp()) for u in page.get("Uploads", [])]
            if not page.get("IsTruncated"):
                return out
            marks = {"KeyMarker": page["NextKeyMarker"], "UploadIdMarker": page["NextUploadIdMarker"]}

    def abort_upload(self, key: str, upload_id: str) -> None:
        self._call("abort_multipart_upload", Key=key, UploadId=upload_id)

    def stream(self, key: str):
        """The object's body as a stream (for --deep verification)."""
        return self._call("get_object", Key=key)["Body"]


def check_r2(settings: Settings) -> dict:
    """Put, head, get and delete a probe object. Returns per-operation latency in milliseconds.
    Fails within seconds on a wrong endpoint: one attempt, 5 s connect timeout."""
    bucket = Bucket(settings)
    key = layout.probe_key()
    body = b"modelferry check-r2 probe\n"
    timings = {}
    t = time.perf_counter()
    bucket.put_bytes(key, body, "text/plain")
    timings["put_ms"] = (time.perf_counter() - t) * 1000
    try:
        t = time.perf_counter()
        head = bucket._call("head_object", Key=key)
        timings["head_ms"] = (time.perf_counter() - t) * 1000
        t = time.perf_counter()
        got = bucket.get_bytes(key)
        timings["get_ms"] = (time.perf_counter() - t) * 1000
        if got != body or head["ContentLength"] != len(body):
            raise BucketError(f"{settings.endpoint} returned other bytes than were written to {key}")
    finally:
        t = time.perf_counter()
        bucket._call("delete_object", Key=key)
        timings["delete_ms"] = (time.perf_counter() - t) * 1000
    return {"endpoint": settings.endpoint, "bucket": settings.bucket, **{k: round(v, 1) for k, v in timings.items()}}
