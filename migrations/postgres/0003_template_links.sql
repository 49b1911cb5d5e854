-- Template-linked policies (per-resource sharing). `policy_links_meta.generation` grows
-- with every link change; commits read it with the policy version.
CREATE TABLE policy_links (
    link_id        TEXT PRIMARY KEY,
    template_id    TEXT NOT NULL,
    principal_type TEXT,
    principal_id   TEXT,
    resource_type  TEXT,
    resource_id    TEXT,
    created_at     BIGINT NOT NULL
);
CREATE TABLE policy_links_meta (id INTEGER PRIMARY KEY CHECK (id = 1), generation BIGINT NOT NULL);
INSERT INTO policy_links_meta (id, generation) VALUES (1, 0);
