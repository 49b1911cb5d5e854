"""The naive peer of issue 12: the FastAPI pattern Lockstep replaces, on the floor's
tables (bench/floor-schema.sql). PUT /items/{id} {"n": 1} with `Authorization: Bearer
<HS256 JWT>`: decode the token (PyJWT), SELECT the denylist, SELECT the item, compare
its owner with the token's subject, UPDATE — each statement on its own (autocommit), no
lock, no audit record. Racy by design: a logout, a revocation or an ownership transfer
that commits between the checks and the UPDATE does not stop the write.

Environment: DATABASE_URL (postgresql://…), JWT_SECRET_FILE (the HS256 secret, raw
bytes), NAIVE_POOL (asyncpg connections per worker, default 10 — asyncpg's own default).
Run (bench/floor.sh does): uvicorn app:app --app-dir bench/naive --workers 2
"""
import os
from contextlib import asynccontextmanager

import asyncpg
import jwt
from fastapi import FastAPI, Header, HTTPException
from pydantic import BaseModel

SECRET = open(os.environ["JWT_SECRET_FILE"], "rb").read()
POOL_SIZE = int(os.environ.get("NAIVE_POOL", "10"))
pool: asyncpg.Pool


@asynccontextmanager
async def lifespan(_app):
    global pool
    pool = await asyncpg.create_pool(os.environ["DATABASE_URL"], min_size=POOL_SIZE, max_size=POOL_SIZE)
    yield
    await pool.close()


app = FastAPI(lifespan=lifespan)


class Patch(BaseModel):
    n: int


@app.get("/healthz")
async def healthz():
    return {"ok": True}


@app.put("/items/{item_id}")
async def update_item(item_id: str, patch: Patch, authorization: str | None = Header(None)):
    if not authorization or not authorization.startswith("Bearer "):
        raise HTTPException(401, "missing bearer token")
    try:
        claims = jwt.decode(authorization[7:], SECRET, algorithms=["HS256"], options={"require": ["sub", "jti", "exp"]})
    except jwt.InvalidTokenError:
        raise HTTPException(401, "invalid token") from None
    async with pool.acquire() as con:
        if await con.fetchval("SELECT 1 FROM denylist WHERE token_id = $1", claims["jti"]):
            raise HTTPException(401, "token revoked")
        owner = await con.fetchval("SELECT owner_id FROM items WHERE id = $1", item_id)
        if owner is None:
            raise HTTPException(404, "no such item")
        if owner != claims["sub"]:
            raise HTTPException(403, "not the owner")
        # The race: whatever commits from here on is not seen by this write.
        await con.execute("UPDATE items SET n = $2, version = version + 1 WHERE id = $1", item_id, patch.n)
    return {"id": item_id}
