-- The application's own tables, PostgreSQL (the `public` schema; Lockstep keeps its own
-- tables in the `lockstep` schema). mapping.toml maps users, groups, memberships and
-- items onto Cedar entities; denylist belongs to the naive service only; item_writes is
-- the race script's record of when each write landed.

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
    version  bigint not null default 1
);

-- The naive service's logout: the jtis it refuses from now on.
create table denylist (
    jti text primary key
);

-- One row per committed update of items, whoever made it (the naive service's own SQL
-- or Lockstep's mapped write), stamped with the database clock. The trigger is a
-- deferred constraint trigger: it fires at COMMIT, so `at` is when the write became
-- visible (to within the commit's own flush), not when its UPDATE ran.
create table item_writes (
    seq            bigserial primary key,
    item_id        text not null,
    title          text not null,
    owner_at_write text not null,
    at             timestamptz not null
);

-- `set search_path`: the function runs in whichever session writes items, and Lockstep's
-- sessions have its own schema as their only search_path, so an unqualified name would
-- not be found there. Pin it (or qualify every name) in any function on a mapped table.
create function log_item_write() returns trigger language plpgsql set search_path = public as $$
begin
    insert into item_writes (item_id, title, owner_at_write, at)
    values (new.id, new.title, new.owner_id, clock_timestamp());
    return null;
end
$$;

create constraint trigger item_writes_log after update on items
    deferrable initially deferred
    for each row execute function log_item_write();
