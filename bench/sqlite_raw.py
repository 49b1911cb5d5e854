"""The same transaction as one AuthorizeAndCommit, on SQLite with nothing in front:
BEGIN IMMEDIATE, the store's reads, the update, the audit insert, COMMIT (WAL,
synchronous=FULL), from N threads. Prints transactions/s and p50/p99 in ms.
Usage: python3 sqlite_raw.py DB_FILE CLIENTS SECONDS SUBJECTS"""
import random
import sqlite3
import sys
import threading
import time

db, clients, seconds, subjects = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
lock = threading.Lock()  # the server's single writer connection: writers queue in process
lat = []


def worker():
    con = sqlite3.connect(db, isolation_level=None, timeout=30, check_same_thread=False)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=FULL")
    end = time.monotonic() + seconds
    mine = []
    while time.monotonic() < end:
        n = random.randrange(subjects)
        t0 = time.monotonic()
        with lock:
            con.execute("BEGIN IMMEDIATE")
            con.execute("SELECT * FROM keys WHERE kid = 'bench'").fetchall()
            con.execute(
                "SELECT (SELECT revoked_at_secs FROM revoked_subjects WHERE etype = 'User' AND eid = ?1), "
                "EXISTS (SELECT 1 FROM revoked_tokens WHERE token_id = ?2), (SELECT max(version) FROM policies), "
                "(SELECT generation FROM policy_links_meta WHERE id = 1)",
                (f"u{n}", f"jti-{n}"),
            ).fetchall()
            con.execute("SAVEPOINT lockstep_mutations")
            con.execute("SELECT etype, eid, attributes, parents, version FROM entities WHERE etype = 'Item' AND eid = ?", (f"i{n}",)).fetchall()
            con.execute(
                "WITH RECURSIVE anc(etype, eid) AS (SELECT s.value ->> '$.type', s.value ->> '$.id' FROM json_each(?1) AS s "
                "UNION SELECT p.value ->> '$.type', p.value ->> '$.id' FROM anc JOIN entities e ON e.etype = anc.etype AND e.eid = anc.eid, "
                "json_each(e.parents) AS p) SELECT e.etype, e.eid, e.attributes, e.parents, e.version FROM anc JOIN entities e ON e.etype = anc.etype AND e.eid = anc.eid",
                (f'[{{"type":"User","id":"u{n}"}}]',),
            ).fetchall()
            con.execute(
                "UPDATE entities SET attributes = ?, parents = '[]', version = version + 1 WHERE etype = 'Item' AND eid = ?",
                (f'{{"hot":false,"n":1,"owner":{{"__entity":{{"id":"u{n}","type":"User"}}}}}}', f"i{n}"),
            )
            con.execute(
                "INSERT INTO audit (time, kind, principal_type, principal_id, token_id, mutations, entities, detail) "
                "VALUES (0, 1, 'User', ?, ?, '[]', '[]', '') RETURNING seq",
                (f"u{n}", f"jti-{n}"),
            ).fetchall()
            con.execute("COMMIT")
        mine.append(time.monotonic() - t0)
    with lock:
        lat.extend(mine)


threads = [threading.Thread(target=worker) for _ in range(clients)]
for t in threads:
    t.start()
for t in threads:
    t.join()
lat.sort()
p = lambda q: lat[min(int(len(lat) * q), len(lat) - 1)] * 1000
print(f"{len(lat) / seconds:.0f} {p(0.5):.2f} {p(0.99):.2f}")
