-- Plain rows in the application's tables (both backends): Lockstep reads these as the
-- Cedar entities User::"alice", Group::"banned", Item::"doc1", … through mapping.toml.
insert into users (id, name) values ('alice', 'Alice'), ('bob', 'Bob'), ('mallory', 'Mallory');
insert into groups (id) values ('staff'), ('banned');
insert into memberships (user_id, group_id) values ('alice', 'staff'), ('bob', 'staff'), ('mallory', 'banned');
insert into items (id, title, owner_id) values ('doc1', 'Quarterly report', 'alice'), ('doc2', 'Mallory''s notes', 'mallory');
