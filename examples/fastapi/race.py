"""Races logouts, ownership transfers and bans against writes through app.py, on its naive
path and on its Lockstep path, and counts the writes that landed after the revoking change
had returned.

For each path (naive, lockstep) and each revoking change, on a fresh item:
  logout    alice logs out while --writers threads PUT /items/{id} with her token;
  transfer  alice transfers the item to bob while the writers PUT it as alice;
  ban       an administrator's plain SQL puts the owner (a fresh user, so alice stays
            unbanned) into Group::"banned" — a direct write to the application's own
            memberships table, which Lockstep reads as the user's parents.
The writers start --before seconds ahead of the revoking call and stop --after seconds
after it returned. Every write carries a unique title; item_writes (filled by a trigger,
stamped by the database clock) says when each one landed. A write of the revoked
authority (alice's token after the logout, alice after the transfer, the banned owner)
that landed after the revoking change returned to this script is a violation: the naive
path has some whenever the race is hit, Lockstep must have none.

Also checked first, on both paths: alice may update her item (200); bob may not (403), nor
transfer it (403); mallory, in Group::"banned", may not update even her own item (403);
no token or a forged one is 401.

Exit status: 1 when Lockstep let a write land after a revocation, answered a status it
should not have, or when OK answers and logged writes disagree; 0 otherwise (a naive
path that happened not to lose the race only warns).

Usage, with app.py and `lockstep serve --mapping mapping.toml` running on DATABASE_URL:
    python race.py --app http://127.0.0.1:8000 --database sqlite:///abs/app.db \
        --secret-file secret.bin --kid app
"""
import argparse
import collections
import os
import pathlib
import sys
import threading
import time
import uuid

import httpx
import jwt

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from appdb import Database  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("--app", default=os.environ.get("APP_URL", "http://127.0.0.1:8000"))
ap.add_argument("--database", default=os.environ.get("DATABASE_URL"))
ap.add_argument("--secret-file", default=os.environ.get("JWT_SECRET_FILE"))
ap.add_argument("--kid", default=os.environ.get("JWT_KID", "app"))
ap.add_argument("--writers", type=int, default=6, help="concurrent writers (default 6)")
ap.add_argument("--before", type=float, default=0.3, help="seconds of writes before the revoking call")
ap.add_argument("--after", type=float, default=0.3, help="seconds of writes after it returned")
ap.add_argument("--paths", default="naive,lockstep")
ap.add_argument("--changes", default="logout,transfer,ban")
args = ap.parse_args()
if not args.database or not args.secret_file:
    sys.exit("race.py: --database (DATABASE_URL) and --secret-file (JWT_SECRET_FILE) are required")

db = Database(args.database)
secret = pathlib.Path(args.secret_file).read_bytes()
PREFIX = {"lockstep": "", "naive": "/naive"}


def token(sub: str, key: bytes = secret) -> str:
    """A token Lockstep accepts (HS256, kid header, sub/iat/exp/jti) and so does the naive path."""
    now = int(time.time())
    claims = {"sub": sub, "iat": now, "exp": now + 600, "jti": uuid.uuid4().hex}
    return jwt.encode(claims, key, algorithm="HS256", headers={"kid": args.kid})


def auth(tok: str | None) -> dict:
    return {"authorization": f"Bearer {tok}"} if tok else {}


def new_item(name: str, owner: str) -> str:
    """A fresh item, inserted by plain SQL into the application's table."""
    item = f"{name}-{uuid.uuid4().hex[:6]}"
    db.query("insert into items (id, title, owner_id) values (?, 'start', ?)", item, owner)
    return item


def checks(client: httpx.Client, path: str) -> list[str]:
    """The decisions both paths must make; returns the ones that came out wrong."""
    p = PREFIX[path]
    item, hers = new_item(f"check-{path}", "alice"), new_item(f"check-{path}-mallory", "mallory")
    alice, bob, mallory = token("alice"), token("bob"), token("mallory")
    cases = [
        ("alice updates her item", "PUT", f"/items/{item}", {"title": "mine"}, alice, 200),
        ("bob updates alice's item", "PUT", f"/items/{item}", {"title": "bob's"}, bob, 403),
        ("bob transfers alice's item to himself", "POST", f"/items/{item}/transfer", {"to": "bob"}, bob, 403),
        ("mallory (banned) updates her own item", "PUT", f"/items/{hers}", {"title": "hi"}, mallory, 403),
        ("no token", "PUT", f"/items/{item}", {"title": "anon"}, None, 401),
        ("a token signed with another secret", "PUT", f"/items/{item}", {"title": "forged"},
         token("alice", b"x" * 32), 401),
    ]
    wrong = []
    for what, method, url, body, tok, want in cases:
        r = client.request(method, p + url, json=body, headers=auth(tok))
        if r.status_code != want:
            wrong.append(f"{path}: {what}: want {want}, got {r.status_code} {r.text}")
    return wrong


Write = collections.namedtuple("Write", "title sent answered status")


def race(client: httpx.Client, path: str, change: str) -> dict:
    p = PREFIX[path]
    who = "alice"
    if change == "ban":
        who = f"dave-{uuid.uuid4().hex[:6]}"
        db.query("insert into users (id, name) values (?, 'Dave')", who)
        db.query("insert into memberships (user_id, group_id) values (?, 'staff')", who)
    item = new_item(f"race-{path}-{change}", who)
    tok = token(who)
    writes: list[Write] = []  # list.append is atomic under the GIL
    stop = threading.Event()

    def writer(i: int):
        with httpx.Client(base_url=args.app, timeout=10) as c:
            n = 0
            while not stop.is_set():
                title = f"w{i}-{n}"
                n += 1
                sent = time.time()
                try:
                    status = c.put(f"{p}/items/{item}", json={"title": title}, headers=auth(tok)).status_code
                except httpx.HTTPError:
                    status = 0  # no answer: counted, never taken as refused
                writes.append(Write(title, sent, time.time(), status))
                if status != 200:
                    time.sleep(0.02)  # refused: keep trying (a late write would show), but gently

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(args.writers)]
    for t in threads:
        t.start()
    time.sleep(args.before)
    r0 = time.time()
    if change == "logout":
        resp = client.post(f"{p}/logout", headers=auth(tok))
    elif change == "transfer":
        resp = client.post(f"{p}/items/{item}/transfer", json={"to": "bob"}, headers=auth(tok))
    else:  # ban: returns once committed (autocommit)
        db.query("insert into memberships (user_id, group_id) values (?, 'banned')", who)
        resp = httpx.Response(200)
    r1 = time.time()
    time.sleep(args.after)
    stop.set()
    for t in threads:
        t.join()

    # When each title first appeared (a transfer's own row repeats the title it left alone).
    landed: dict[str, float] = {}
    for title, at in db.write_times(item):
        landed.setdefault(title, at)
    sent_titles = {w.title for w in writes}
    ok_titles = {w.title for w in writes if w.status == 200}
    logged_titles = {t for t in landed if t in sent_titles}
    refused = collections.Counter(w.status for w in writes if w.status != 200)
    return {
        "path": path, "change": change, "revoke_status": resp.status_code, "revoke_body": resp.text,
        "writes": len(writes), "ok": len(ok_titles), "refused": refused,
        "overlapping": sum(1 for w in writes if w.sent < r1 and w.answered > r0),
        "landed_after": sorted(landed[t] - r1 for t in logged_titles if landed[t] > r1),
        "ok_not_logged": sorted(ok_titles - logged_titles), "logged_not_ok": sorted(logged_titles - ok_titles),
    }


def main() -> int:
    backend = db.backend
    with httpx.Client(base_url=args.app, timeout=10) as client:
        health = client.get("/healthz").json()
        print(f"race: {backend}, app {args.app} (NAIVE_WORK_MS={health.get('work_ms')}), "
              f"{args.writers} writers, {args.before}s before / {args.after}s after each revoking call")
        failures = []
        for path in args.paths.split(","):
            failures += checks(client, path)
        print("checks: " + ("every decision as expected on every path" if not failures else "FAILED"))
        results = [race(client, path, change) for path in args.paths.split(",") for change in args.changes.split(",")]

    print(f"\n{'backend':9}{'path':10}{'change':10}{'writes':>7}{'ok':>6}  {'refused':14}"
          f"{'overlapping':>12}{'landed after revoke':>21}")
    for r in results:
        refused = ", ".join(f"{n}×{s or 'no answer'}" for s, n in sorted(r["refused"].items())) or "-"
        print(f"{backend:9}{r['path']:10}{r['change']:10}{r['writes']:>7}{r['ok']:>6}  {refused:14}"
              f"{r['overlapping']:>12}{len(r['landed_after']):>21}")

    for r in results:
        name = f"{backend} {r['path']} {r['change']}"
        if r["revoke_status"] != 200:
            failures.append(f"{name}: the revoking call answered {r['revoke_status']} {r['revoke_body']}")
        if r["path"] == "lockstep":
            if r["landed_after"]:
                late = ", ".join(f"+{d * 1000:.1f} ms" for d in r["landed_after"])
                failures.append(f"{name}: {len(r['landed_after'])} write(s) landed after "
                                f"the revoking call returned ({late})")
            want = 401 if r["change"] == "logout" else 403
            odd = {s: n for s, n in r["refused"].items() if s != want}
            if odd:
                failures.append(f"{name}: refusals should all be {want}, got {dict(r['refused'])}")
        elif set(r["refused"]) - {401, 403}:
            failures.append(f"{name}: unexpected answers {dict(r['refused'])}")
        if r["ok_not_logged"] or r["logged_not_ok"]:
            failures.append(f"{name}: answered OK but not logged {r['ok_not_logged'][:5]}, "
                            f"logged but not answered OK {r['logged_not_ok'][:5]}")
        if r["path"] == "naive" and not r["landed_after"]:
            print(f"warning: {name}: the naive path did not lose the race this time "
                  "(raise NAIVE_WORK_MS or --writers)")
        if r["overlapping"] == 0:
            print(f"warning: {name}: no write overlapped the revoking call; the race was not exercised")
    for f in failures:
        print(f"FAIL: {f}")
    if failures:
        return 1
    if "lockstep" in args.paths.split(","):
        print("\nLockstep: no write landed after the revoking call returned.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
