-- The application's own tables, SQLite (the same file Lockstep serves: its own tables sit
-- beside these). mapping.toml maps users, groups, memberships and items onto Cedar
-- entities; denylist belongs to the naive service only; item_writes is the race script's
-- record of when each write landed.

create table users (
    id   text primary key,
    name text
);

create table groups (
    id text primary key
);

create table memberships (
    user_id  text not null references users,
    group_id text not null references groups,
    primary key (user_id, group_id)
);

create table items (
    id       text primary key,
    title    text not null,
    owner_id text not null references users,
    version  integer not null default 1
);

-- The naive service's logout: the jtis it refuses from now on.
create table denylist (
    jti text primary key
);

-- One row per update of items, whoever made it (the naive service's own SQL or Lockstep's
-- mapped write), stamped with the database clock in unix seconds (SQLite's clock has
-- millisecond resolution). SQLite has one writer at a time and the row commits with the
-- update, so a write stamped before a revocation returned also committed before it.
create table item_writes (
    seq            integer primary key autoincrement,
    item_id        text not null,
    title          text not null,
    owner_at_write text not null,
    at             real not null
);

create trigger item_writes_log after update on items for each row
begin
    insert into item_writes (item_id, title, owner_at_write, at)
    values (new.id, new.title, new.owner_id, (julianday('now') - 2440587.5) * 86400.0);
end;
