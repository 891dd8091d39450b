-- sessiond schema v4: deployment-wide facts kept with the sessions, e.g. the durability mode of the last start (a
-- start in another mode must not ignore acked changes still in the previous mode's journal).

CREATE TABLE deployment_markers (
    key    text PRIMARY KEY,
    value  text NOT NULL
);
