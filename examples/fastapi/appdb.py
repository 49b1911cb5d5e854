"""The application's database, for the naive service and the race script: one
connection per thread, autocommit (each statement its own transaction, as in the
article's handlers), SQL written with `?` placeholders for both backends.

URLs are Lockstep's: sqlite:///abs/path.db, sqlite://relative.db,
postgres://user@host:5432/db.
"""
import sqlite3
import threading


class Database:
    def __init__(self, url: str):
        self.url = url
        if url.startswith("sqlite://"):
            self.backend = "sqlite"
            self._path = url[len("sqlite://"):].split("?", 1)[0]
        elif url.startswith(("postgres://", "postgresql://")):
            self.backend = "postgres"
        else:
            raise ValueError(f"DATABASE_URL `{url}`: expected sqlite://… or postgres://…")
        self._local = threading.local()

    def _conn(self):
        conn = getattr(self._local, "conn", None)
        if conn is None:
            if self.backend == "sqlite":
                # Autocommit; wait up to 5 s for the write lock (Lockstep holds it while it commits).
                conn = sqlite3.connect(self._path, timeout=5, isolation_level=None, check_same_thread=False)
                conn.execute("pragma foreign_keys = on")
            else:
                import psycopg

                conn = psycopg.connect(self.url, autocommit=True)
            self._local.conn = conn
        return conn

    def query(self, sql: str, *params):
        """Runs one statement (its own transaction) and returns its rows as tuples."""
        if self.backend == "postgres":
            sql = sql.replace("?", "%s")
        cur = self._conn().execute(sql, params)
        rows = cur.fetchall() if cur.description else []
        cur.close()
        return rows

    def one(self, sql: str, *params):
        rows = self.query(sql, *params)
        return rows[0] if rows else None

    def write_times(self, item_id: str):
        """(title, unix seconds) of every logged write to an item (see item_writes)."""
        if self.backend == "postgres":
            sql = "select title, extract(epoch from at)::float8 from item_writes where item_id = ? order by seq"
        else:
            sql = "select title, at from item_writes where item_id = ? order by seq"
        return self.query(sql, item_id)
