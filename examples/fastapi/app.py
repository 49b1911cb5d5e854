"""The FastAPI service of the well-known write-up on JWT races in FastAPI (decode the token,
check ownership, write; a denylist for logout), twice over the same tables.

Lockstep path — each handler is one gRPC call; the token check, the revocation check, the
Cedar decision against the rows as they are, the write and the audit record are one
transaction inside Lockstep:
    PUT  /items/{id}           {"title": "…"}  AuthorizeAndCommit UpdateItem, merge_patch {title}
    POST /items/{id}/transfer  {"to": "bob"}   AuthorizeAndCommit UpdateItem, merge_patch {owner}
    POST /logout                               RevokeToken (the caller's own token)

Naive path — the article's pattern: decode the JWT, check the denylist, read the item,
compare the owner, write; each step its own statement:
    PUT  /naive/items/{id}, POST /naive/items/{id}/transfer, POST /naive/logout

Both take `Authorization: Bearer <jwt>` (HS256, signed with the secret given to
`lockstep keys add`) and answer 200, or 401/403/404/409/422/503 with {"detail": …}.

Environment:
    DATABASE_URL     the application's database, in Lockstep's URL form (sqlite:///abs.db,
                     postgres://postgres@127.0.0.1:5432/app); `lockstep serve` must serve it
    LOCKSTEP_ADDR    Lockstep's gRPC address (default 127.0.0.1:50051)
    JWT_SECRET_FILE  the HS256 secret (raw bytes), for the naive path's own decoding
    NAIVE_WORK_MS    default 0: a pause standing for the work a real handler does between
                     deciding and writing (validation, rendering, another service). Both
                     paths pay it in PUT and transfer: the naive one between its check and
                     its write, the Lockstep one before its call — so the two differ only in
                     where the check happens.

Run: uvicorn app:app --app-dir examples/fastapi --port 8000
"""
import os
import pathlib
import sys
import tempfile
import time

import grpc
import grpc_tools
import jwt
from fastapi import FastAPI, Header, HTTPException
from google.protobuf import json_format
from grpc_tools import protoc
from pydantic import BaseModel

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from appdb import Database  # noqa: E402

# Stubs generated from proto/ at start, as in examples/python/client.py.
ROOT = pathlib.Path(__file__).resolve().parents[2]
_gen = tempfile.mkdtemp(prefix="lockstep-stubs-")
_wkt = pathlib.Path(grpc_tools.__file__).parent / "_proto"
if protoc.main(["protoc", f"-I{ROOT / 'proto'}", f"-I{_wkt}", f"--python_out={_gen}", f"--grpc_python_out={_gen}",
                str(ROOT / "proto/lockstep/v1/lockstep.proto")]) != 0:
    sys.exit("protoc failed")
sys.path.insert(0, _gen)
from lockstep.v1 import lockstep_pb2 as pb  # noqa: E402
from lockstep.v1 import lockstep_pb2_grpc as rpc  # noqa: E402

db = Database(os.environ["DATABASE_URL"])
SECRET = pathlib.Path(os.environ["JWT_SECRET_FILE"]).read_bytes()
WORK_SECONDS = int(os.environ.get("NAIVE_WORK_MS", "0")) / 1000
lockstep = rpc.LockstepStub(grpc.insecure_channel(os.environ.get("LOCKSTEP_ADDR", "127.0.0.1:50051")))
CALL_TIMEOUT = 5.0

app = FastAPI(title="Lockstep FastAPI example")


class TitleBody(BaseModel):
    title: str


class TransferBody(BaseModel):
    to: str


def bearer(authorization: str | None) -> str:
    if not authorization or not authorization.startswith("Bearer "):
        raise HTTPException(401, "missing bearer token")
    return authorization[len("Bearer "):]


def work():
    """The handler's own work between deciding and writing (NAIVE_WORK_MS)."""
    if WORK_SECONDS:
        time.sleep(WORK_SECONDS)


@app.get("/healthz")
def healthz():
    return {"ok": True, "work_ms": round(WORK_SECONDS * 1000)}


# --- Lockstep path: thin AuthorizeAndCommit / RevokeToken calls -----------------------

# gRPC status → HTTP status. Every other code (UNKNOWN, INTERNAL, …) is a 502.
HTTP_STATUS = {
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.INVALID_ARGUMENT: 422,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


def call(method, request, token: str):
    try:
        return method(request, metadata=[("authorization", f"Bearer {token}")], timeout=CALL_TIMEOUT)
    except grpc.RpcError as e:
        raise HTTPException(HTTP_STATUS.get(e.code(), 502), f"{e.code().name}: {e.details()}") from None


def update_item(item_id: str, patch: dict, token: str) -> dict:
    m = pb.Mutation(action="UpdateItem", resource=pb.EntityRef(type="Item", id=item_id))
    m.update.merge_patch.update(patch)
    work()
    r = call(lockstep.AuthorizeAndCommit, pb.AuthorizeAndCommitRequest(mutations=[m]), token)
    e = r.entities[0]
    attrs = json_format.MessageToDict(e.attributes)
    return {"id": e.uid.id, "title": attrs["title"], "owner": attrs["owner"]["__entity"]["id"],
            "version": e.version, "audit_seq": r.audit_seq}


@app.put("/items/{item_id}")
def put_item(item_id: str, body: TitleBody, authorization: str | None = Header(None)):
    return update_item(item_id, {"title": body.title}, bearer(authorization))


@app.post("/items/{item_id}/transfer")
def transfer_item(item_id: str, body: TransferBody, authorization: str | None = Header(None)):
    return update_item(item_id, {"owner": {"__entity": {"type": "User", "id": body.to}}}, bearer(authorization))


@app.post("/logout")
def logout(authorization: str | None = Header(None)):
    r = call(lockstep.RevokeToken, pb.RevokeTokenRequest(), bearer(authorization))
    return {"logged_out": True, "audit_seq": r.audit_seq}


# --- Naive path: decode, check, write --------------------------------------------------

def naive_caller(authorization: str | None) -> dict:
    """Decodes and checks the token; the denylist is read now, not when the write lands."""
    try:
        claims = jwt.decode(bearer(authorization), SECRET, algorithms=["HS256"],
                            options={"require": ["exp", "iat", "sub", "jti"]})
    except jwt.InvalidTokenError as e:
        raise HTTPException(401, f"invalid token: {e}") from None
    if db.one("select 1 from denylist where jti = ?", claims["jti"]):
        raise HTTPException(401, "token has been revoked")
    return claims


def naive_check_owner(item_id: str, sub: str):
    """The article's check: the item exists, the caller owns it (and is not banned)."""
    row = db.one("select owner_id from items where id = ?", item_id)
    if row is None:
        raise HTTPException(404, "no such item")
    if row[0] != sub or db.one("select 1 from memberships where user_id = ? and group_id = 'banned'", sub):
        raise HTTPException(403, "not allowed")


def naive_row(row) -> dict:
    if row is None:
        raise HTTPException(404, "no such item")
    return {"id": row[0], "title": row[1], "owner": row[2], "version": row[3]}


@app.put("/naive/items/{item_id}")
def naive_put_item(item_id: str, body: TitleBody, authorization: str | None = Header(None)):
    claims = naive_caller(authorization)
    naive_check_owner(item_id, claims["sub"])
    work()
    # The service bumps `version` itself. Left alone, the trigger `lockstep mapping install`
    # adds would bump it — on SQLite with a second UPDATE, which fires item_writes_log twice.
    row = db.one("update items set title = ?, version = version + 1 where id = ? "
                 "returning id, title, owner_id, version", body.title, item_id)
    return naive_row(row)


@app.post("/naive/items/{item_id}/transfer")
def naive_transfer_item(item_id: str, body: TransferBody, authorization: str | None = Header(None)):
    claims = naive_caller(authorization)
    naive_check_owner(item_id, claims["sub"])
    if not db.one("select 1 from users where id = ?", body.to):
        raise HTTPException(422, "no such user")
    work()
    row = db.one("update items set owner_id = ?, version = version + 1 where id = ? "
                 "returning id, title, owner_id, version", body.to, item_id)
    return naive_row(row)


@app.post("/naive/logout")
def naive_logout(authorization: str | None = Header(None)):
    claims = naive_caller(authorization)
    db.query("insert into denylist (jti) values (?) on conflict do nothing", claims["jti"])
    return {"logged_out": True}
