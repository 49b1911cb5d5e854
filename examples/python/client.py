"""Lockstep from Python (grpcio): create, update with if_version (retry on ABORTED),
a denial, logout, and the write refused after it.

Stubs are generated from proto/ at run time (grpcio-tools). Usage:
    LOCKSTEP_ADDR=127.0.0.1:50051 ALICE=<jwt> BOB=<jwt> python3 client.py
"""
import os
import pathlib
import sys
import tempfile
import uuid

import grpc
import grpc_tools
from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parents[2]
gen = tempfile.mkdtemp()
wkt = pathlib.Path(grpc_tools.__file__).parent / "_proto"
if protoc.main(["protoc", f"-I{ROOT / 'proto'}", f"-I{wkt}", f"--python_out={gen}", f"--grpc_python_out={gen}",
                str(ROOT / "proto/lockstep/v1/lockstep.proto")]) != 0:
    sys.exit("protoc failed")
sys.path.insert(0, gen)
from lockstep.v1 import lockstep_pb2 as pb  # noqa: E402
from lockstep.v1 import lockstep_pb2_grpc as rpc  # noqa: E402

addr = os.environ.get("LOCKSTEP_ADDR", "127.0.0.1:50051")
alice, bob = os.environ["ALICE"], os.environ["BOB"]
stub = rpc.LockstepStub(grpc.insecure_channel(addr))


def auth(token):
    return [("authorization", f"Bearer {token}")]


def expect(code, fn):
    try:
        fn()
    except grpc.RpcError as e:
        if e.code() != code:
            sys.exit(f"expected {code}, got {e.code()}: {e.details()}")
        return e
    sys.exit(f"expected {code}, got OK")


item = f"py-{uuid.uuid4().hex[:8]}"
ref = pb.EntityRef(type="Item", id=item)

# 1. Create an item alice owns.
create = pb.Mutation(action="CreateItem", resource=ref)
create.create.attributes.update({"owner": {"__entity": {"type": "User", "id": "alice"}}, "title": "From Python", "status": "draft"})
r = stub.AuthorizeAndCommit(pb.AuthorizeAndCommitRequest(mutations=[create]), metadata=auth(alice))
print(f"created Item::{item} version {r.entities[0].version} (audit seq {r.audit_seq})")

# 2. Read-modify-write with if_version; a stale version is ABORTED, then retried.
def update_title(title, if_version):
    m = pb.Mutation(action="UpdateItem", resource=ref, if_version=if_version)
    m.update.merge_patch.update({"title": title})
    return stub.AuthorizeAndCommit(pb.AuthorizeAndCommitRequest(mutations=[m]), metadata=auth(alice))

e = expect(grpc.StatusCode.ABORTED, lambda: update_title("stale", 99))
print(f"stale if_version: ABORTED ({e.details()})")
for attempt in range(5):
    current = stub.GetEntity(pb.GetEntityRequest(uid=ref, action="ReadItem"), metadata=auth(alice)).entity
    try:
        r = update_title("Edited from Python", current.version)
        print(f"updated with if_version={current.version}: now version {r.entities[0].version}")
        break
    except grpc.RpcError as err:
        if err.code() != grpc.StatusCode.ABORTED:
            raise
else:
    sys.exit("gave up after 5 ABORTED attempts")

# 3. bob is not the owner: PERMISSION_DENIED.
m = pb.Mutation(action="UpdateItem", resource=ref)
m.update.merge_patch.update({"title": "bob was here"})
e = expect(grpc.StatusCode.PERMISSION_DENIED, lambda: stub.AuthorizeAndCommit(pb.AuthorizeAndCommitRequest(mutations=[m]), metadata=auth(bob)))
print(f"bob: PERMISSION_DENIED ({e.details()})")

# 4. alice logs out; 5. her next write is refused.
stub.RevokeToken(pb.RevokeTokenRequest(), metadata=auth(alice))
print("alice logged out")
e = expect(grpc.StatusCode.UNAUTHENTICATED, lambda: update_title("after logout", None))
print(f"write after logout: UNAUTHENTICATED ({e.details()})")
print("python client: all steps as expected")
